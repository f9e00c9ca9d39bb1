"""Shared by the aggregator tests: reference invoices vs what the billing store says."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

from unkey_deploy.billing.customers import CustomerInfo, MemoryDirectory
from unkey_deploy.billing.queries import BillingQueries
from unkey_deploy.clickhouse.api import Storage
from unkey_deploy.core.clock import FakeClock
from unkey_deploy.metering.codec import Encoder, samples_to_array
from unkey_deploy.metering.model import Batch

from .reference import RawSample, reference_invoices, series_hours
from .scenarios import Series, raw_of

HOUR = 3_600_000_000_000
# two customers' pricing terms (discount %, credits): one with both, one with neither
TERMS = {"cust_a": (Decimal("7.50"), Decimal("0.03")), "cust_b": (Decimal(0), Decimal(0))}
HOLD = 120.0  # the aggregator's hold timeout in these tests


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def encode(b: Batch) -> bytes:
    """As billaged would, but letting invalid samples through (they are quarantined one by one
    by the aggregator, see test_invalid_samples.py)."""
    return Encoder().encode_array(b.key, b.seq, samples_to_array(b.samples), check=False)


def directory(terms: dict[str, tuple[Decimal, Decimal]]) -> MemoryDirectory:
    return MemoryDirectory(
        CustomerInfo(c, "ten_x", "standard", pct, bal) for c, (pct, bal) in terms.items()
    )


def assert_bills_match(
    storage: Storage, raw: list[RawSample], terms: dict[str, tuple[Decimal, Decimal]]
) -> int:
    ref = reference_invoices(raw, {c: (Fraction(p), Fraction(b)) for c, (p, b) in terms.items()})
    q = BillingQueries(storage, directory(terms), FakeClock())
    assert ref, "scenario produced no usage"
    for (cust, month), r in ref.items():
        inv = q.invoice(cust, month)
        got = {ln.item: Fraction(ln.amount) for ln in inv.lines}
        assert got == r["lines"], (cust, month, got, r["lines"])
        assert Fraction(inv.subtotal) == r["subtotal"]
        assert Fraction(inv.discount) == r["discount"]
        assert Fraction(inv.credits_applied) == r["credits"]
        assert Fraction(inv.total) == r["total"], (cust, month)
    return len(ref)


def month(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns // 10**9, UTC).strftime("%Y-%m")


def hourly(storage: Storage) -> dict[tuple[str, str, int], dict[str, int]]:
    """billing_hourly as read (FINAL): quantities per VM instance and hour (zero rows too)."""
    rows = storage.query(
        "SELECT vm_id, instance_id, toUnixTimestamp(hour) AS h, cpu_time_ns, mem_byte_ns, "
        "net_rx_bytes + net_tx_bytes AS net, sample_count FROM billing_hourly FINAL"
    )
    return {
        (r["vm_id"], r["instance_id"], int(r["h"]) // 3600): {
            "cpu": int(r["cpu_time_ns"]),
            "mem": int(r["mem_byte_ns"]),
            "net": int(r["net"]),
            "n": int(r["sample_count"]),
        }
        for r in rows
    }


def assert_hours_match(storage: Storage, series: list[Series]) -> None:
    """Every billing_hourly row equals the reference's hour (an hour without valid samples may
    only hold a zero row, left by a recomputation)."""
    want: dict[tuple[str, str, int], dict[str, int]] = {}
    for s in series:
        hours, _v, _i = series_hours(raw_of([s]))
        for h, u in hours.items():
            want[(s.key.vm_id, s.key.instance_id, h)] = dict(u)
    got = hourly(storage)
    zero = {"cpu": 0, "mem": 0, "net": 0, "n": 0}
    assert {k: v for k, v in got.items() if v != zero} == want
