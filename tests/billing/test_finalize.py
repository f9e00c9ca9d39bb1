"""Issuing (finalising) a customer-month invoice: a number, frozen lines and totals, credits
taken exactly once, and usage of an issued month that arrives later billed as adjustment lines
on the next month's invoice, so that what is billed for each month adds up, to the cent, to an
independent reference over all its samples."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.orm import Session, sessionmaker

from unkey_deploy.billing.aggregator import Aggregator, Incoming
from unkey_deploy.billing.customers import SqlDirectory
from unkey_deploy.billing.invoice import Invoice, Line, build_invoice, to_html
from unkey_deploy.billing.ledger import InvoiceLedger, IssuedInvoiceRow
from unkey_deploy.billing.queries import BillingQueries
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.clock import FakeClock
from unkey_deploy.core.errors import IllegalTransition, InvalidInput, NotFound
from unkey_deploy.metering.codec import encode
from unkey_deploy.metering.model import SeriesKey
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db

from .reference import reference_invoices
from .scenarios import Series, big_series, raw_of, to_batches

GIB = 2**30
S = 10**9


def _ns(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * S


@dataclass
class Env:
    factory: sessionmaker[Session]
    storage: ChdbStorage
    clock: FakeClock
    q: BillingQueries
    agg: Aggregator
    acme: str
    globex: str

    def balance(self, customer_id: str) -> Decimal:
        with self.factory() as s:
            return cp.get_customer(s, customer_id).credit_balance

    def deliver(self, batches: list[bytes]) -> None:
        out = self.agg.process([Incoming(i, b) for i, b in enumerate(batches)])
        assert out.term == [] and out.held == 0 and len(out.ack) == len(batches)


@pytest.fixture
def env(tmp_path: Path, storage: ChdbStorage) -> Iterator[Env]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    db.upgrade(engine)
    factory = db.session_factory(engine)
    with db.transaction(factory) as s:
        acme = cp.create_customer(
            s, "acme", now=0, discount_pct=Decimal("10.00"), credit_balance=Decimal("3.000000")
        ).id
        globex = cp.create_customer(s, "globex", now=0).id
    clock = FakeClock(_ns("2026-11-15T12:00:00"))
    directory = SqlDirectory(factory, ttl_s=0.0)
    q = BillingQueries(storage, directory, clock, InvoiceLedger(factory, clock))
    try:
        yield Env(factory, storage, clock, q, Aggregator(storage, directory), acme, globex)
    finally:
        engine.dispose()


def amounts(inv: Invoice, *, adjustment_for: str | None = None) -> dict[str, Fraction]:
    return {ln.item: Fraction(ln.amount) for ln in inv.lines if ln.adjustment_for == adjustment_for}


def test_issue_freezes_takes_credits_once_and_bills_late_usage_on_the_next_invoice(
    env: Env,
) -> None:
    rng = random.Random(61)
    a = big_series(
        rng, SeriesKey(env.acme, "vm_a", "i1", 16, 64 * GIB), _ns("2026-10-31T20:00"), 360
    )
    late = big_series(
        rng, SeriesKey(env.acme, "vm_l", "i1", 8, 8 * GIB), _ns("2026-10-30T08:00"), 90
    )
    g = big_series(
        rng, SeriesKey(env.globex, "vm_g", "i1", 4, 4 * GIB), _ns("2026-10-31T23:00"), 120
    )
    a_batches = [encode(b) for b in to_batches(a, size=120)]
    cut = 2  # vm_a's later batches (the rest of October, and November) come late
    assert all(s.t < _ns("2026-11-01T00:00") for s in a.samples[: cut * 120 + 120])
    early = Series(a.key, a.samples[: cut * 120])
    env.deliver(a_batches[:cut] + [encode(b) for b in to_batches(g, size=120)])

    terms = {env.acme: (Fraction(10), Fraction(3)), env.globex: (Fraction(0), Fraction(0))}
    ref_early = reference_invoices(raw_of([early, g]), terms)
    draft = env.q.invoice(env.acme, "2026-10")
    assert draft.status == "draft" and draft.number is None
    assert amounts(draft) == ref_early[(env.acme, "2026-10")]["lines"]

    # the current month is still a draft: it cannot be issued
    with pytest.raises(IllegalTransition, match="before the month is over"):
        env.q.issue(env.acme, "2026-11")

    # issue October, from 4 threads at once and once more: ONE invoice, credits taken once
    results: list[tuple[Invoice, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(env.q.issue(env.acme, "2026-10")))
        for _ in range(4)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    results.append(env.q.issue(env.acme, "2026-10"))
    assert sum(now for _inv, now in results) == 1
    oct_inv = results[0][0]
    assert {inv.to_json() == oct_inv.to_json() for inv, _now in results} == {True}
    assert oct_inv.status == "issued" and oct_inv.number == "INV-202610-00001"
    r = ref_early[(env.acme, "2026-10")]
    assert amounts(oct_inv) == r["lines"]
    assert Fraction(oct_inv.total) == r["total"] and Fraction(oct_inv.credits_applied) == 3
    assert r["subtotal"] - r["discount"] > 3, "the scenario should use up the credits"
    assert env.balance(env.acme) == Decimal(0)
    g_inv, _ = env.q.issue(env.globex, "2026-10")
    assert g_inv.number == "INV-202610-00002"

    # late usage of October arrives: the issued invoice does not change
    env.deliver(a_batches[cut:] + [encode(b) for b in to_batches(late, size=120)])
    assert env.q.invoice(env.acme, "2026-10").to_json() == oct_inv.to_json()
    assert [i.number for i in env.q.issued_invoices(env.acme)] == ["INV-202610-00001"]

    # ... it is billed on November's invoice as adjustments of October, so that October's
    # amounts add up to the reference over ALL its samples, per line, to the cent
    ref = reference_invoices(raw_of([a, late, g]), terms)
    env.clock.advance(20 * 86400)  # 2026-12-05
    nov = env.q.invoice(env.acme, "2026-11")
    assert amounts(nov) == ref[(env.acme, "2026-11")]["lines"]
    adj = amounts(nov, adjustment_for="2026-10")
    assert set(adj) == {"vcpu", "memory", "network"}
    full_oct = ref[(env.acme, "2026-10")]["lines"]
    assert {k: amounts(oct_inv)[k] + adj[k] for k in adj} == full_oct
    subtotal = sum(amounts(nov).values()) + sum(adj.values())
    discount = round(subtotal * Fraction(10, 100), 2)
    assert Fraction(nov.subtotal) == subtotal and Fraction(nov.discount) == discount
    assert Fraction(nov.credits_applied) == 0  # used up by October
    assert Fraction(nov.total) == subtotal - discount

    nov_issued, now = env.q.issue(env.acme, "2026-11")
    assert now and nov_issued.number == "INV-202611-00001"
    assert nov_issued.total == nov.total and nov_issued.lines == nov.lines
    # the adjustment is billed once: December has nothing to adjust
    dec = env.q.invoice(env.acme, "2026-12")
    assert dec.lines == () and dec.total == 0
    # the HTML document says what it is
    page = to_html(nov_issued)
    assert "INV-202611-00001" in page and "adjustment for 2026-10" in page


def test_a_negative_net_goes_to_the_credit_balance(env: Env) -> None:
    """A correction that lowers an issued month's usage can leave a month owing the customer:
    the invoice's total is 0 and the difference is credited, once."""
    lines = build_invoice(
        env.acme, "2026-10", [], discount_pct=Decimal(10), credit_balance=Decimal(3)
    ).lines
    assert lines == ()
    refund = Line(
        "vcpu", "vCPU-hours", Decimal("-40"), Decimal("0.05"), Decimal("-2.00"), "v1", "standard"
    )
    inv = build_invoice(
        env.acme,
        "2026-10",
        [],
        discount_pct=Decimal(10),
        credit_balance=Decimal(3),
        adjustments=[refund],
    )
    assert (inv.subtotal, inv.discount, inv.credits_applied) == (
        Decimal("-2.00"),
        Decimal("-0.20"),
        Decimal("0.00"),
    )
    assert (inv.total, inv.credit_added) == (Decimal("0.00"), Decimal("1.80"))
    ledger = InvoiceLedger(env.factory, env.clock)
    for _ in range(2):
        ledger.issue(env.acme, "2026-10", lambda _bal, _billed: (inv, []))
    assert env.balance(env.acme) == Decimal("4.80")


def test_issuing_needs_a_known_customer_and_a_valid_month(env: Env) -> None:
    with pytest.raises(NotFound):
        env.q.issue("cus_nobody", "2026-10")
    with pytest.raises(InvalidInput, match="YYYY-MM"):
        env.q.issue(env.acme, "2026-13")
    assert env.balance(env.acme) == Decimal(3)


@pytest.mark.postgres
def test_concurrent_issuers_on_postgresql_issue_once_with_distinct_numbers(
    postgres_url: str, storage: ChdbStorage
) -> None:
    """Row locks and the unique constraints, not a process lock, keep issuing exactly-once on
    PostgreSQL: 8 threads issue the same month of two customers at once."""
    engine = db.make_engine(postgres_url)
    db.upgrade(engine)
    factory = db.session_factory(engine)
    rng = random.Random()
    # the database is shared with other tests and runs: a month of its own (numbers are per month)
    year, mon = rng.randrange(1975, 2020), rng.randrange(1, 13)
    month = f"{year:04d}-{mon:02d}"
    with db.transaction(factory) as s:
        ids = [
            cp.create_customer(
                s, f"issuer-{month}-{rng.random()}", now=0, credit_balance=Decimal("2.500000")
            ).id
            for _ in range(2)
        ]
    clock = FakeClock(_ns("2026-11-15T12:00:00"))
    directory = SqlDirectory(factory, ttl_s=0.0)
    agg = Aggregator(storage, directory)
    start = _ns(f"{month}-10T00:00")
    for n, cust in enumerate(ids):
        s = big_series(rng, SeriesKey(cust, f"vm_{n}", "i1", 16, 16 * GIB), start, 60)
        out = agg.process([Incoming(i, encode(b)) for i, b in enumerate(to_batches(s))])
        assert out.term == [] and out.held == 0
    q = BillingQueries(storage, directory, clock, InvoiceLedger(factory, clock))
    drafts = {c: q.invoice(c, month) for c in ids}
    assert all(d.subtotal > Decimal("2.50") for d in drafts.values())
    results: list[tuple[str, Invoice, bool]] = []
    errors: list[BaseException] = []

    def issue(c: str) -> None:
        try:
            inv, now = q.issue(c, month)
            results.append((c, inv, now))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=issue, args=(c,)) for c in ids * 4]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert errors == []
        assert sorted(c for c, _inv, now in results if now) == sorted(ids)
        numbers = {c: {inv.number for cc, inv, _now in results if cc == c} for c in ids}
        assert all(len(v) == 1 for v in numbers.values())
        assert len({next(iter(v)) for v in numbers.values()}) == 2
        with factory() as s:
            for c in ids:
                assert cp.get_customer(s, c).credit_balance == Decimal(0)
                assert drafts[c].lines == q.invoice(c, month).lines
    finally:
        engine.dispose()


class _Mono:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_batch_skipped_by_the_hold_timeout_and_delivered_after_issuing_is_an_adjustment(
    env: Env,
) -> None:
    """The aggregator stops waiting for a missing batch (hold timeout), the month is issued,
    then the batch comes: its hours are recomputed (newer billing_hourly rows), the issued
    invoice stays as it was, and the next invoice's adjustments make October add up to the
    reference over all samples, to the cent."""
    rng = random.Random(67)
    a = big_series(
        rng, SeriesKey(env.acme, "vm_h", "i1", 16, 16 * GIB), _ns("2026-10-31T18:00"), 300
    )
    batches = [encode(b) for b in to_batches(a, size=120)]
    missing = 2
    assert a.samples[(missing + 1) * 120].t < _ns("2026-11-01T00:00"), "batch 2 is October's"
    mono = _Mono()
    agg = Aggregator(env.storage, SqlDirectory(env.factory, ttl_s=0.0), monotonic=mono)
    out = agg.process([Incoming(i, b) for i, b in enumerate(batches) if i != missing])
    assert out.held == len(batches) - missing - 1  # waiting for the missing one
    mono.now += agg.hold_timeout_s + 1
    out = agg.process([])
    assert out.held == 0  # applied without it

    terms = {env.acme: (Fraction(10), Fraction(3))}
    without = Series(a.key, a.samples[: missing * 120] + a.samples[(missing + 1) * 120 :])
    oct_inv, now = env.q.issue(env.acme, "2026-10")
    assert now
    assert (
        amounts(oct_inv)
        == reference_invoices(raw_of([without]), terms)[(env.acme, "2026-10")]["lines"]
    )

    out = agg.process([Incoming(99, batches[missing], redelivered=True)])
    assert out.ack == [99] and out.term == []
    assert env.q.invoice(env.acme, "2026-10").to_json() == oct_inv.to_json()
    ref = reference_invoices(raw_of([a]), terms)
    env.clock.advance(20 * 86400)
    nov = env.q.invoice(env.acme, "2026-11")
    adj = amounts(nov, adjustment_for="2026-10")
    assert adj, "the late batch should adjust October"
    full_oct = ref[(env.acme, "2026-10")]["lines"]
    assert {k: amounts(oct_inv)[k] + adj.get(k, Fraction(0)) for k in full_oct} == full_oct
    assert (env.acme, "2026-11") not in ref and amounts(nov) == {}  # October's usage only
    assert Fraction(nov.subtotal) == sum(adj.values())


def test_the_ledger_models_match_the_billing_migration(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        db.upgrade(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), db.Base.metadata)
        ours = [d for d in diff if "billing_" in repr(d)]
        assert ours == []
        # a control: a drifted model is reported
        col = IssuedInvoiceRow.__table__.c.document
        col.nullable = True
        try:
            with engine.connect() as conn:
                diff = compare_metadata(MigrationContext.configure(conn), db.Base.metadata)
            assert any("billing_invoices" in repr(d) for d in diff)
        finally:
            col.nullable = False
    finally:
        engine.dispose()
