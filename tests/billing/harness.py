"""Shared by the aggregator tests: reference invoices vs what the billing store says."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

from unkey_deploy.billing.customers import CustomerInfo, MemoryDirectory
from unkey_deploy.billing.queries import BillingQueries
from unkey_deploy.clickhouse.api import Storage
from unkey_deploy.core.clock import FakeClock

from .reference import RawSample, reference_invoices


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
