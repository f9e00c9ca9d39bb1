"""An independent reference for BILLING.md: plain Python over raw samples, no numpy, no code
shared with the aggregator. The bill must equal this to the cent."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any


@dataclass(frozen=True)
class RawSample:
    customer_id: str
    vm_id: str
    instance_id: str
    vcpus: int
    memory_total_bytes: int
    t: int
    cpu_time_ns: int
    memory_used_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int


PRICES = {"vcpu": Fraction("0.05"), "memory": Fraction("0.01"), "network": Fraction("0.10")}


def month_of_hour(t_ns: int) -> str:
    hour_start_s = (t_ns // 3_600_000_000_000) * 3600
    return datetime.fromtimestamp(hour_start_s, UTC).strftime("%Y-%m")


def series_usage(samples: list[RawSample]) -> tuple[dict[str, dict[str, int]], int, int]:
    """Per month: cpu_ns, mem_byte_ns, net_bytes of one series; and (#valid, #invalid)."""
    hours, valid, invalid = series_hours(samples)
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"cpu": 0, "mem": 0, "net": 0})
    for hour, u in hours.items():
        m = out[month_of_hour(hour * 3_600_000_000_000)]
        for k in ("cpu", "mem", "net"):
            m[k] += u[k]
    return dict(out), valid, invalid


def series_hours(samples: list[RawSample]) -> tuple[dict[int, dict[str, int]], int, int]:
    """Per UTC hour (index since the epoch): cpu_ns, mem_byte_ns, net_bytes and the number of
    valid samples of one series; and (#valid, #invalid)."""
    by_t: dict[int, RawSample] = {}
    for s in samples:  # samples arrive in any order; the first of each t counts... but all
        by_t.setdefault(s.t, s)  # copies of one t are identical in our scenarios
    out: dict[int, dict[str, int]] = defaultdict(lambda: {"cpu": 0, "mem": 0, "net": 0, "n": 0})
    last: RawSample | None = None
    valid = invalid = 0
    for t in sorted(by_t):
        s = by_t[t]
        values = (
            s.t,
            s.cpu_time_ns,
            s.memory_used_bytes,
            s.net_rx_bytes,
            s.net_tx_bytes,
            s.disk_read_bytes,
            s.disk_write_bytes,
        )
        # memory over the allocation, or a negative value (counters start at 0 at boot)
        bad = s.memory_used_bytes > s.memory_total_bytes or min(values) < 0
        if last is not None and not bad:
            for c in (
                "cpu_time_ns",
                "net_rx_bytes",
                "net_tx_bytes",
                "disk_read_bytes",
                "disk_write_bytes",
            ):
                if getattr(s, c) < getattr(last, c):
                    bad = True
            dt = s.t - last.t
            if not bad and 100 * Fraction(s.cpu_time_ns - last.cpu_time_ns, s.vcpus * dt) > 100:
                bad = True
        if bad:
            invalid += 1
            continue
        valid += 1
        m = out[s.t // 3_600_000_000_000]
        m["n"] += 1
        if last is None:
            m["cpu"] += s.cpu_time_ns
            m["net"] += s.net_rx_bytes + s.net_tx_bytes
        else:
            m["cpu"] += s.cpu_time_ns - last.cpu_time_ns
            m["net"] += (s.net_rx_bytes - last.net_rx_bytes) + (s.net_tx_bytes - last.net_tx_bytes)
            dt = s.t - last.t
            if dt <= 1_000_000_000:
                m["mem"] += last.memory_used_bytes * dt
        last = s
    return dict(out), valid, invalid


def reference_invoices(
    samples: list[RawSample], customers: dict[str, tuple[Fraction, Fraction]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """(customer, month) -> {lines: {item: cents}, subtotal, discount, credits, total} as
    Fractions; ``customers`` maps id -> (discount_pct, credit_balance)."""
    series: dict[tuple[str, str, str], list[RawSample]] = defaultdict(list)
    for s in samples:
        series[(s.customer_id, s.vm_id, s.instance_id)].append(s)
    qty: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"cpu": 0, "mem": 0, "net": 0})
    for (cust, _vm, _inst), ss in series.items():
        months, _v, _i = series_usage(ss)
        for month, u in months.items():
            for k, v in u.items():
                qty[(cust, month)][k] += v
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for (cust, month), u in qty.items():
        lines = {
            "vcpu": round(Fraction(u["cpu"], 3_600_000_000_000) * PRICES["vcpu"], 2),
            "memory": round(Fraction(u["mem"], 3_600_000_000_000 * 2**30) * PRICES["memory"], 2),
            "network": round(Fraction(u["net"], 2**30) * PRICES["network"], 2),
        }
        subtotal = sum(lines.values(), Fraction(0))
        pct, balance = customers[cust]
        discount = round(subtotal * pct / 100, 2)
        credits = max(Fraction(0), min(balance, subtotal - discount))
        out[(cust, month)] = {
            "lines": lines,
            "subtotal": subtotal,
            "discount": discount,
            "credits": credits,
            "total": subtotal - discount - credits,
        }
    return out
