"""Typed reads over a :class:`~unkey_deploy.clickhouse.api.Storage` (the design's three queries,
corrected, plus per-VM usage and billing rows).

Every tenant-facing function takes ``customer_id`` and always filters on it (bound as a query
parameter, never formatted into SQL). ``capacity_planning`` is the one platform-wide query: pass
``customer_id=None`` only from operator paths. Times are timezone-aware UTC ``datetime``s passed
in by the caller (from its injected clock), never ``now()`` inside SQL, so results are testable.

Corrections to the seed design: the dashboard sums per-interval DELTAS (``metrics_raw`` stores
deltas); the monthly bill reads ``billing_hourly FINAL`` (without it a recomputed hour counts
twice); capacity planning reads the per-customer hourly rollup's states (``quantileTDigestMerge``),
not a scan of raw rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from ..core.errors import InvalidInput
from .api import BillingHourlyRow, Storage

GIB = 1 << 30
NS_PER_HOUR = 3_600_000_000_000
NS_PER_S = 1_000_000_000

Resolution = Literal["5min", "hour", "day"]
_ROLLUPS: dict[str, tuple[str, str]] = {
    "5min": ("metrics_5min", "bucket"),
    "hour": ("metrics_hourly", "hour"),
    "day": ("metrics_daily", "day"),
}


def _need_customer(customer_id: str) -> str:
    if not isinstance(customer_id, str) or not customer_id:
        raise InvalidInput("customer_id is required for tenant-scoped usage queries")
    return customer_id


def _utc(t: datetime, name: str) -> datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise InvalidInput(f"{name} must be a timezone-aware datetime (UTC)")
    return t.astimezone(UTC)


def _ts(t: datetime) -> str:
    """A UTC datetime as ClickHouse DateTime64(6) text (bound with {x:DateTime64(6, 'UTC')})."""
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _as_utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, int) and not isinstance(value, bool):
        # ClickHouse's Arrow output (chDB) carries DateTime as UInt32 epoch seconds
        return datetime.fromtimestamp(value, UTC)
    raise InvalidInput(f"expected a datetime from ClickHouse, got {value!r}")


# -- 1. real-time dashboard ------------------------------------------------------------------

SQL_DASHBOARD = """
SELECT
    vm_id,
    avg(cpu_usage_percent) AS avg_cpu,
    max(cpu_usage_percent) AS max_cpu,
    max(memory_used_bytes) AS max_memory_bytes,
    max(memory_total_bytes) AS memory_total_bytes,
    sum(network_rx_bytes) AS network_rx_bytes,
    sum(network_tx_bytes) AS network_tx_bytes,
    sum(disk_read_bytes) AS disk_read_bytes,
    sum(disk_write_bytes) AS disk_write_bytes,
    sum(gap_ns) AS gap_ns,
    count() AS samples,
    max(timestamp) AS last_seen
FROM metrics_raw
WHERE customer_id = {customer_id:String}
  AND timestamp > {since:DateTime64(6, 'UTC')}
  AND timestamp <= {until:DateTime64(6, 'UTC')}
GROUP BY vm_id
ORDER BY avg_cpu DESC, vm_id
"""


@dataclass(frozen=True, slots=True)
class VmStatus:
    vm_id: str
    avg_cpu: float
    max_cpu: float
    max_memory_bytes: int
    memory_total_bytes: int
    network_rx_bytes: int
    network_tx_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    gap_ns: int
    samples: int
    last_seen: datetime

    @property
    def max_memory_gb(self) -> float:
        return self.max_memory_bytes / GIB

    @property
    def total_network_mb(self) -> float:
        return (self.network_rx_bytes + self.network_tx_bytes) / (1 << 20)


def dashboard(
    storage: Storage, /, *, customer_id: str, now: datetime, minutes: int = 5
) -> list[VmStatus]:
    """The customer's VMs over the last ``minutes`` (intervals closing in (now-minutes, now]),
    busiest first. Network/disk are exact byte sums of the intervals' deltas."""
    if not 1 <= minutes <= 24 * 60:
        raise InvalidInput("minutes must be between 1 and 1440")
    until = _utc(now, "now")
    rows = storage.query(
        SQL_DASHBOARD,
        {
            "customer_id": _need_customer(customer_id),
            "since": _ts(until - timedelta(minutes=minutes)),
            "until": _ts(until),
        },
    )
    return [
        VmStatus(
            vm_id=str(r["vm_id"]),
            avg_cpu=float(r["avg_cpu"]),
            max_cpu=float(r["max_cpu"]),
            max_memory_bytes=int(r["max_memory_bytes"]),
            memory_total_bytes=int(r["memory_total_bytes"]),
            network_rx_bytes=int(r["network_rx_bytes"]),
            network_tx_bytes=int(r["network_tx_bytes"]),
            disk_read_bytes=int(r["disk_read_bytes"]),
            disk_write_bytes=int(r["disk_write_bytes"]),
            gap_ns=int(r["gap_ns"]),
            samples=int(r["samples"]),
            last_seen=_as_utc(r["last_seen"]),
        )
        for r in rows
    ]


# -- 2. monthly bill ---------------------------------------------------------------------------

SQL_MONTHLY = """
SELECT
    sum(toDecimal128(cpu_time_ns, 0)) AS cpu_time_ns,
    sum(mem_byte_ns) AS mem_byte_ns,
    sum(toDecimal128(net_rx_bytes, 0)) AS net_rx_bytes,
    sum(toDecimal128(net_tx_bytes, 0)) AS net_tx_bytes,
    sum(toDecimal128(disk_read_bytes, 0)) AS disk_read_bytes,
    sum(toDecimal128(disk_write_bytes, 0)) AS disk_write_bytes,
    sum(toDecimal128(gap_ns, 0)) AS gap_ns,
    sum(toDecimal128(sample_count, 0)) AS sample_count,
    sum(storage_byte_ns) AS storage_byte_ns,
    sum(cost) AS cost,
    count() AS vm_hours,
    groupUniqArray(pricing_version) AS pricing_versions
FROM billing_hourly FINAL
WHERE customer_id = {customer_id:String}
  AND hour >= {start:DateTime('UTC')}
  AND hour < {end:DateTime('UTC')}
"""


@dataclass(frozen=True, slots=True)
class MonthlyUsage:
    """A customer's month from ``billing_hourly FINAL``: integer totals and the unrounded cost
    sum. Quantities in billing units are exact Decimals (GB = 2^30 bytes)."""

    customer_id: str
    month: str  # "YYYY-MM"
    cpu_time_ns: int
    mem_byte_ns: int
    net_rx_bytes: int
    net_tx_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    gap_ns: int
    sample_count: int
    storage_byte_ns: int
    cost: Decimal
    vm_hours: int
    pricing_versions: tuple[str, ...]

    @property
    def vcpu_hours(self) -> Decimal:
        return Decimal(self.cpu_time_ns) / Decimal(NS_PER_HOUR)

    @property
    def memory_gb_hours(self) -> Decimal:
        return Decimal(self.mem_byte_ns) / Decimal(GIB) / Decimal(NS_PER_HOUR)

    @property
    def network_gb(self) -> Decimal:
        return Decimal(self.net_rx_bytes + self.net_tx_bytes) / Decimal(GIB)


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """``"YYYY-MM"`` -> [first hour, first hour of next month) in UTC."""
    try:
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    except ValueError as exc:
        raise InvalidInput(f"month must be YYYY-MM, got {month!r}") from exc
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else (start.replace(month=start.month + 1))
    )
    return start, end


def monthly_bill(storage: Storage, /, *, customer_id: str, month: str) -> MonthlyUsage:
    """Totals of the customer's ``billing_hourly`` rows in the UTC month (newest versions only)."""
    start, end = month_bounds(month)
    rows = storage.query(
        SQL_MONTHLY,
        {
            "customer_id": _need_customer(customer_id),
            "start": start.strftime("%Y-%m-%d %H:%M:%S"),
            "end": end.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    r = rows[0]
    return MonthlyUsage(
        customer_id=customer_id,
        month=month,
        cpu_time_ns=int(r["cpu_time_ns"]),
        mem_byte_ns=int(r["mem_byte_ns"]),
        net_rx_bytes=int(r["net_rx_bytes"]),
        net_tx_bytes=int(r["net_tx_bytes"]),
        disk_read_bytes=int(r["disk_read_bytes"]),
        disk_write_bytes=int(r["disk_write_bytes"]),
        gap_ns=int(r["gap_ns"]),
        sample_count=int(r["sample_count"]),
        storage_byte_ns=int(r["storage_byte_ns"]),
        cost=Decimal(r["cost"]),
        vm_hours=int(r["vm_hours"]),
        pricing_versions=tuple(sorted(str(v) for v in r["pricing_versions"])),
    )


# -- 3. capacity planning ----------------------------------------------------------------------

SQL_CAPACITY = """
SELECT
    hour,
    quantileTDigestMerge(0.95)(cpu_p95) AS p95_cpu,
    max(cpu_max) AS max_cpu,
    max(mem_max) AS peak_vm_memory_bytes,
    uniqExactMerge(active_vms) AS active_vms,
    sum(sample_count) AS samples
FROM capacity_hourly
WHERE hour >= {start:DateTime('UTC')}
  AND hour < {end:DateTime('UTC')}
  AND ({all_customers:UInt8} = 1 OR customer_id = {customer_id:String})
GROUP BY hour
ORDER BY hour DESC
"""


@dataclass(frozen=True, slots=True)
class CapacityHour:
    hour: datetime
    p95_cpu: float  # p95 of the intervals' CPU % over all VMs in the hour (t-digest estimate)
    max_cpu: float
    peak_vm_memory_bytes: int  # the largest memory of any one VM in the hour
    active_vms: int
    samples: int

    @property
    def peak_memory_gb(self) -> float:
        return self.peak_vm_memory_bytes / GIB


def capacity_planning(
    storage: Storage, /, *, customer_id: str | None, start: datetime, end: datetime
) -> list[CapacityHour]:
    """Per UTC hour in [start, end), newest first, from the hourly rollup. ``customer_id=None``
    is platform-wide (operators only); otherwise scoped to that customer. Reads
    ``capacity_hourly`` (one t-digest per customer-hour, fed from the 5-minute rollup)."""
    s, e = _utc(start, "start"), _utc(end, "end")
    if customer_id is not None:
        _need_customer(customer_id)
    rows = storage.query(
        SQL_CAPACITY,
        {
            "start": s.strftime("%Y-%m-%d %H:%M:%S"),
            "end": e.strftime("%Y-%m-%d %H:%M:%S"),
            "all_customers": 1 if customer_id is None else 0,
            "customer_id": customer_id or "",
        },
    )
    return [
        CapacityHour(
            hour=_as_utc(r["hour"]),
            p95_cpu=float(r["p95_cpu"]),
            max_cpu=float(r["max_cpu"]),
            peak_vm_memory_bytes=int(r["peak_vm_memory_bytes"]),
            active_vms=int(r["active_vms"]),
            samples=int(r["samples"]),
        )
        for r in rows
    ]


# -- per-VM usage over time --------------------------------------------------------------------


def _sql_vm_usage(resolution: Resolution) -> str:
    table, col = _ROLLUPS[resolution]
    # the table and column come from _ROLLUPS, never from input
    return f"""
SELECT
    vm_id,
    toDateTime({col}, 'UTC') AS t,
    avgMerge(cpu_avg) AS avg_cpu,
    max(cpu_max) AS max_cpu,
    quantileTDigestMerge(0.95)(cpu_p95) AS p95_cpu,
    avgMerge(mem_avg) AS avg_memory_bytes,
    max(mem_max) AS max_memory_bytes,
    sum(cpu_time_ns) AS cpu_time_ns,
    sum(network_rx_bytes) AS network_rx_bytes,
    sum(network_tx_bytes) AS network_tx_bytes,
    sum(disk_read_bytes) AS disk_read_bytes,
    sum(disk_write_bytes) AS disk_write_bytes,
    sum(gap_ns) AS gap_ns,
    sum(sample_count) AS samples
FROM {table}
WHERE customer_id = {{customer_id:String}}
  AND ({{any_vm:UInt8}} = 1 OR vm_id = {{vm_id:String}})
  AND {col} >= {{start:DateTime('UTC')}}
  AND {col} < {{end:DateTime('UTC')}}
GROUP BY vm_id, t
ORDER BY vm_id, t
"""  # noqa: S608


SQL_VM_USAGE: dict[str, str] = {res: _sql_vm_usage(res) for res in ("5min", "hour", "day")}


@dataclass(frozen=True, slots=True)
class UsagePoint:
    vm_id: str
    t: datetime  # start of the bucket (UTC)
    avg_cpu: float
    max_cpu: float
    p95_cpu: float
    avg_memory_bytes: float
    max_memory_bytes: int
    cpu_time_ns: int
    network_rx_bytes: int
    network_tx_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    gap_ns: int
    samples: int


def vm_usage(
    storage: Storage,
    /,
    *,
    customer_id: str,
    start: datetime,
    end: datetime,
    vm_id: str | None = None,
    resolution: Resolution = "5min",
) -> list[UsagePoint]:
    """The customer's VMs (or one VM) per bucket in [start, end) from the 5-min/hourly/daily
    rollup. A bucket is included when its start is in the range."""
    if resolution not in _ROLLUPS:
        raise InvalidInput(f"resolution must be one of {sorted(_ROLLUPS)}, got {resolution!r}")
    s, e = _utc(start, "start"), _utc(end, "end")
    rows = storage.query(
        SQL_VM_USAGE[resolution],
        {
            "customer_id": _need_customer(customer_id),
            "any_vm": 1 if vm_id is None else 0,
            "vm_id": vm_id or "",
            "start": s.strftime("%Y-%m-%d %H:%M:%S"),
            "end": e.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    out: list[UsagePoint] = []
    for r in rows:
        out.append(
            UsagePoint(
                vm_id=str(r["vm_id"]),
                t=_as_utc(r["t"]),
                avg_cpu=float(r["avg_cpu"]),
                max_cpu=float(r["max_cpu"]),
                p95_cpu=float(r["p95_cpu"]),
                avg_memory_bytes=float(r["avg_memory_bytes"]),
                max_memory_bytes=int(r["max_memory_bytes"]),
                cpu_time_ns=int(r["cpu_time_ns"]),
                network_rx_bytes=int(r["network_rx_bytes"]),
                network_tx_bytes=int(r["network_tx_bytes"]),
                disk_read_bytes=int(r["disk_read_bytes"]),
                disk_write_bytes=int(r["disk_write_bytes"]),
                gap_ns=int(r["gap_ns"]),
                samples=int(r["samples"]),
            )
        )
    return out


# -- billing rows ------------------------------------------------------------------------------

SQL_BILLING_ROWS = """
SELECT
    customer_id, vm_id, instance_id, hour, cpu_time_ns, mem_byte_ns, net_rx_bytes, net_tx_bytes,
    disk_read_bytes, disk_write_bytes, gap_ns, sample_count, storage_byte_ns, cost,
    pricing_version, version
FROM billing_hourly FINAL
WHERE customer_id = {customer_id:String}
  AND hour >= {start:DateTime('UTC')}
  AND hour < {end:DateTime('UTC')}
ORDER BY hour, vm_id, instance_id
"""


def billing_rows(storage: Storage, /, *, customer_id: str, month: str) -> list[BillingHourlyRow]:
    """The customer's VM-hour rows in the UTC month, newest version of each (FINAL)."""
    start, end = month_bounds(month)
    rows = storage.query(
        SQL_BILLING_ROWS,
        {
            "customer_id": _need_customer(customer_id),
            "start": start.strftime("%Y-%m-%d %H:%M:%S"),
            "end": end.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    return [
        BillingHourlyRow(
            customer_id=str(r["customer_id"]),
            vm_id=str(r["vm_id"]),
            instance_id=str(r["instance_id"]),
            hour=_as_utc(r["hour"]),
            cpu_time_ns=int(r["cpu_time_ns"]),
            mem_byte_ns=int(r["mem_byte_ns"]),
            net_rx_bytes=int(r["net_rx_bytes"]),
            net_tx_bytes=int(r["net_tx_bytes"]),
            disk_read_bytes=int(r["disk_read_bytes"]),
            disk_write_bytes=int(r["disk_write_bytes"]),
            gap_ns=int(r["gap_ns"]),
            sample_count=int(r["sample_count"]),
            storage_byte_ns=int(r["storage_byte_ns"]),
            cost=Decimal(r["cost"]),
            pricing_version=str(r["pricing_version"]),
            version=int(r["version"]),
        )
        for r in rows
    ]


# -- hour totals from raw (for recomputing a billing hour after a late batch) -------------------

SQL_HOUR_USAGE = """
SELECT
    customer_id, vm_id, instance_id,
    toStartOfHour(timestamp) AS hour,
    sum(cpu_time_ns) AS cpu_time_ns,
    sum(toDecimal128(mem_byte_ns, 0)) AS mem_byte_ns,
    sum(network_rx_bytes) AS net_rx_bytes,
    sum(network_tx_bytes) AS net_tx_bytes,
    sum(disk_read_bytes) AS disk_read_bytes,
    sum(disk_write_bytes) AS disk_write_bytes,
    sum(gap_ns) AS gap_ns,
    count() AS sample_count
FROM metrics_raw
WHERE customer_id = {customer_id:String}
  AND vm_id = {vm_id:String}
  AND timestamp >= {start:DateTime64(3, 'UTC')}
  AND timestamp < {end:DateTime64(3, 'UTC')}
GROUP BY customer_id, vm_id, instance_id, hour
ORDER BY hour, instance_id
"""


@dataclass(frozen=True, slots=True)
class HourUsage:
    """Integer sums of one VM instance's stored intervals in one UTC hour (from metrics_raw)."""

    customer_id: str
    vm_id: str
    instance_id: str
    hour: datetime
    cpu_time_ns: int
    mem_byte_ns: int
    net_rx_bytes: int
    net_tx_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    gap_ns: int
    sample_count: int


def hour_usage(
    storage: Storage, /, *, customer_id: str, vm_id: str, start: datetime, end: datetime
) -> list[HourUsage]:
    """Per (instance, hour) sums of the VM's raw intervals with ``timestamp`` in [start, end).
    Lets the aggregator recompute an hour exactly after a late batch (raw keeps 7 days)."""
    rows = storage.query(
        SQL_HOUR_USAGE,
        {
            "customer_id": _need_customer(customer_id),
            "vm_id": vm_id,
            "start": _ts(_utc(start, "start")),
            "end": _ts(_utc(end, "end")),
        },
    )
    return [
        HourUsage(
            customer_id=str(r["customer_id"]),
            vm_id=str(r["vm_id"]),
            instance_id=str(r["instance_id"]),
            hour=_as_utc(r["hour"]),
            cpu_time_ns=int(r["cpu_time_ns"]),
            mem_byte_ns=int(r["mem_byte_ns"]),
            net_rx_bytes=int(r["net_rx_bytes"]),
            net_tx_bytes=int(r["net_tx_bytes"]),
            disk_read_bytes=int(r["disk_read_bytes"]),
            disk_write_bytes=int(r["disk_write_bytes"]),
            gap_ns=int(r["gap_ns"]),
            sample_count=int(r["sample_count"]),
        )
        for r in rows
    ]
