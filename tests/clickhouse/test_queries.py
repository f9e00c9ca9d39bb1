"""The design's three queries (corrected) and the per-VM/billing reads, on hand-checked data;
every tenant-facing read is scoped to its customer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from chdata import T0, T0_NS, raw_rows

from unkey_deploy.clickhouse import queries
from unkey_deploy.clickhouse.api import BillingHourlyRow
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.errors import InvalidInput

S = 1_000_000_000
GIB = 1 << 30


def _dashboard_data(store: ChdbStorage) -> None:
    rows = [
        # cust_a / vm_1: 3 intervals in the window, one 6 min old (outside a 5 min window)
        {"t_ns": T0_NS - 6 * 60 * S, "cpu_usage_percent": 99.0, "network_rx_bytes": 10**9},
        {
            "t_ns": T0_NS - 60 * S,
            "cpu_usage_percent": 10.0,
            "network_rx_bytes": 100,
            "network_tx_bytes": 1,
            "memory_used_bytes": 2 * GIB,
        },
        {
            "t_ns": T0_NS - 30 * S,
            "cpu_usage_percent": 20.0,
            "network_rx_bytes": 200,
            "network_tx_bytes": 2,
            "memory_used_bytes": 3 * GIB,
            "disk_write_bytes": 7,
        },
        {
            "t_ns": T0_NS,
            "cpu_usage_percent": 30.0,
            "network_rx_bytes": 300,
            "network_tx_bytes": 3,
            "memory_used_bytes": GIB,
            "gap_ns": 5 * S,
        },
        # cust_a / vm_2: one busy interval
        {"t_ns": T0_NS - 10 * S, "vm_id": "vm_2", "cpu_usage_percent": 80.0},
        # after "now": not yet visible
        {"t_ns": T0_NS + S, "cpu_usage_percent": 100.0, "network_rx_bytes": 5},
        # another customer's VM in the same window
        {
            "t_ns": T0_NS - 10 * S,
            "customer_id": "cust_b",
            "vm_id": "vm_9",
            "cpu_usage_percent": 95.0,
        },
    ]
    store.insert_raw(raw_rows(rows))


def test_dashboard_sums_deltas_per_vm_for_one_customer(store: ChdbStorage) -> None:
    _dashboard_data(store)
    vms = queries.dashboard(store, customer_id="cust_a", now=T0, minutes=5)
    assert [v.vm_id for v in vms] == ["vm_2", "vm_1"]  # busiest first
    vm1 = vms[1]
    assert vm1.samples == 3
    assert vm1.avg_cpu == pytest.approx(20.0)
    assert vm1.max_cpu == 30.0
    assert vm1.max_memory_bytes == 3 * GIB and vm1.max_memory_gb == 3.0
    assert (vm1.network_rx_bytes, vm1.network_tx_bytes) == (600, 6)
    assert vm1.total_network_mb == pytest.approx(606 / 2**20)
    assert vm1.disk_write_bytes == 7 and vm1.gap_ns == 5 * S
    assert vm1.last_seen == T0
    assert vms[0].samples == 1 and vms[0].avg_cpu == 80.0
    # tenant scoping: cust_b sees only its VM, an unknown customer nothing
    (b,) = queries.dashboard(store, customer_id="cust_b", now=T0, minutes=5)
    assert b.vm_id == "vm_9"
    assert queries.dashboard(store, customer_id="cust_zz", now=T0) == []
    # a 10 min window includes the older interval
    vm1_10 = next(
        v
        for v in queries.dashboard(store, customer_id="cust_a", now=T0, minutes=10)
        if v.vm_id == "vm_1"
    )
    assert vm1_10.samples == 4 and vm1_10.network_rx_bytes == 10**9 + 600


def test_tenant_scope_is_required(store: ChdbStorage) -> None:
    with pytest.raises(InvalidInput, match="customer_id"):
        queries.dashboard(store, customer_id="", now=T0)
    with pytest.raises(InvalidInput, match="customer_id"):
        queries.monthly_bill(store, customer_id="", month="2026-11")
    with pytest.raises(InvalidInput, match="customer_id"):
        queries.vm_usage(store, customer_id="", start=T0, end=T0)
    with pytest.raises(InvalidInput, match="timezone-aware"):
        queries.dashboard(store, customer_id="cust_a", now=datetime(2026, 1, 1))
    with pytest.raises(InvalidInput, match="YYYY-MM"):
        queries.monthly_bill(store, customer_id="cust_a", month="2026-13")


def _brow(
    customer: str, vm: str, hour: datetime, cost: str, version: int, **kw: int
) -> BillingHourlyRow:
    base = {
        "cpu_time_ns": 0,
        "mem_byte_ns": 0,
        "net_rx_bytes": 0,
        "net_tx_bytes": 0,
        "disk_read_bytes": 0,
        "disk_write_bytes": 0,
        "gap_ns": 0,
        "sample_count": 0,
        "storage_byte_ns": 0,
    }
    base.update(kw)
    return BillingHourlyRow(
        customer_id=customer,
        vm_id=vm,
        instance_id="inst_1",
        hour=hour,
        cost=Decimal(cost),
        pricing_version="v1",
        version=version,
        **base,
    )


def test_monthly_bill_from_final_rows_month_boundaries_and_scope(store: ChdbStorage) -> None:
    nov_last = datetime(2026, 11, 30, 23, tzinfo=UTC)
    dec_first = datetime(2026, 12, 1, 0, tzinfo=UTC)
    oct_last = datetime(2026, 10, 31, 23, tzinfo=UTC)
    store.upsert_billing_hourly(
        [
            _brow(
                "cust_a",
                "vm_1",
                datetime(2026, 11, 1, tzinfo=UTC),
                "0.05",
                1,
                cpu_time_ns=3_600_000_000_000,
                net_rx_bytes=GIB,
                net_tx_bytes=GIB,
                mem_byte_ns=GIB * 3_600_000_000_000,
                sample_count=36_000,
            ),
            _brow("cust_a", "vm_2", nov_last, "0.000000000001", 1, cpu_time_ns=1, sample_count=9),
            _brow("cust_a", "vm_3", nov_last, "0.01", 1, cpu_time_ns=5, sample_count=4),
            _brow("cust_a", "vm_1", dec_first, "7", 1, cpu_time_ns=99),
            _brow("cust_a", "vm_1", oct_last, "8", 1, cpu_time_ns=98),
            _brow("cust_b", "vm_9", nov_last, "100", 1, cpu_time_ns=10**12, sample_count=1),
        ]
    )
    # a late batch recomputes vm_2's last hour of November, and leaves vm_3's without usage
    # (a replay writes a zero row for such an hour: it is not a VM-hour)
    store.upsert_billing_hourly(
        [
            _brow("cust_a", "vm_2", nov_last, "0.100000000001", 2, cpu_time_ns=2, sample_count=10),
            _brow("cust_a", "vm_3", nov_last, "0", 2),
        ]
    )
    bill = queries.monthly_bill(store, customer_id="cust_a", month="2026-11")
    assert bill.cost == Decimal("0.150000000001")
    assert bill.cpu_time_ns == 3_600_000_000_000 + 2
    assert bill.vm_hours == 2
    assert bill.vcpu_hours == Decimal(3_600_000_000_002) / Decimal(3_600_000_000_000)
    assert bill.memory_gb_hours == Decimal(1)
    assert bill.network_gb == Decimal(2)
    assert bill.sample_count == 36_010
    assert bill.pricing_versions == ("v1",)
    rows = queries.billing_rows(store, customer_id="cust_a", month="2026-11")
    assert [(r.vm_id, r.hour, r.version) for r in rows] == [
        ("vm_1", datetime(2026, 11, 1, tzinfo=UTC), 1),
        ("vm_2", nov_last, 2),
        ("vm_3", nov_last, 2),
    ]
    dec = queries.monthly_bill(store, customer_id="cust_a", month="2026-12")
    assert (dec.cost, dec.cpu_time_ns) == (Decimal(7), 99)
    other = queries.monthly_bill(store, customer_id="cust_b", month="2026-11")
    assert other.cost == Decimal(100) and other.vm_hours == 1
    empty = queries.monthly_bill(store, customer_id="cust_zz", month="2026-11")
    assert (empty.cost, empty.vm_hours) == (Decimal(0), 0)


def test_capacity_planning_per_hour_from_rollups(store: ChdbStorage) -> None:
    h0, h1 = T0 - timedelta(hours=1), T0
    rows = []
    # hour h0: vm_1 (cust_a) 20 intervals at cpu 10, vm_2 (cust_b) 20 at cpu 50
    for i in range(20):
        t = int(h0.timestamp()) * S + (i + 1) * S
        rows.append({"t_ns": t, "cpu_usage_percent": 10.0, "memory_used_bytes": GIB})
        rows.append(
            {
                "t_ns": t,
                "customer_id": "cust_b",
                "vm_id": "vm_2",
                "cpu_usage_percent": 50.0,
                "memory_used_bytes": 4 * GIB,
            }
        )
    # hour h1: only vm_1, 100 intervals, cpu 0..99
    for i in range(100):
        rows.append(
            {
                "t_ns": T0_NS + (i + 1) * S,
                "cpu_usage_percent": float(i),
                "memory_used_bytes": 2 * GIB,
            }
        )
    store.insert_raw(raw_rows(rows))
    hours = queries.capacity_planning(
        store, customer_id=None, start=h0, end=h1 + timedelta(hours=1)
    )
    assert [h.hour for h in hours] == [h1, h0]  # newest first
    newest, older = hours
    assert (newest.active_vms, newest.samples, newest.peak_vm_memory_bytes) == (1, 100, 2 * GIB)
    assert newest.p95_cpu == pytest.approx(94.5, abs=1.0)  # t-digest estimate of p95 of 0..99
    assert newest.max_cpu == 99.0
    assert (older.active_vms, older.samples, older.peak_memory_gb) == (2, 40, 4.0)
    assert older.p95_cpu == 50.0
    # scoped to one customer
    (only_a,) = list(queries.capacity_planning(store, customer_id="cust_a", start=h0, end=h1))
    assert (only_a.active_vms, only_a.p95_cpu, only_a.peak_memory_gb) == (1, 10.0, 1.0)


def test_vm_usage_single_vm_and_scope(store: ChdbStorage) -> None:
    store.insert_raw(
        raw_rows(
            [
                {"t_ns": T0_NS + S, "cpu_time_ns": 5},
                {"t_ns": T0_NS + S, "vm_id": "vm_2", "cpu_time_ns": 6},
                {"t_ns": T0_NS + S, "customer_id": "cust_b", "vm_id": "vm_1", "cpu_time_ns": 7},
            ]
        )
    )
    end = T0 + timedelta(hours=1)
    both = queries.vm_usage(store, customer_id="cust_a", start=T0, end=end, resolution="hour")
    assert [(p.vm_id, p.cpu_time_ns) for p in both] == [("vm_1", 5), ("vm_2", 6)]
    one = queries.vm_usage(store, customer_id="cust_a", vm_id="vm_2", start=T0, end=end)
    assert [(p.vm_id, p.cpu_time_ns) for p in one] == [("vm_2", 6)]
    # the same vm id under another customer is never visible
    b = queries.vm_usage(store, customer_id="cust_b", vm_id="vm_2", start=T0, end=end)
    assert b == []


def test_hour_usage_sums_raw_intervals_exactly(store: ChdbStorage) -> None:
    big = (64 * GIB) * 100_000_000  # 64 GiB for 100 ms: 6.9e18 byte-ns per interval
    store.insert_raw(
        raw_rows(
            [
                {"t_ns": T0_NS - 1, "mem_byte_ns": 1, "cpu_time_ns": 1},  # previous hour
                *[{"t_ns": T0_NS + i, "mem_byte_ns": big, "cpu_time_ns": 2} for i in range(5)],
                {"t_ns": T0_NS + 1, "instance_id": "inst_2", "mem_byte_ns": 3, "gap_ns": 2 * S},
            ]
        )
    )
    got = queries.hour_usage(
        store,
        customer_id="cust_a",
        vm_id="vm_1",
        start=T0 - timedelta(hours=1),
        end=T0 + timedelta(hours=1),
    )
    assert [(u.hour, u.instance_id, u.mem_byte_ns, u.cpu_time_ns, u.sample_count) for u in got] == [
        (T0 - timedelta(hours=1), "inst_1", 1, 1, 1),
        (T0, "inst_1", 5 * big, 10, 5),  # > 2^64: summed without wrapping
        (T0, "inst_2", 3, 0, 1),
    ]
