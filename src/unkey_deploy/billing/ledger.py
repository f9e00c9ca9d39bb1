"""Issued invoices: numbers, frozen documents, credits consumed exactly once.

Lifecycle of a customer-month invoice: **draft** (computed from ``billing_hourly`` on every read)
-> **issued** (``issue``), a one-way step allowed once the month is over. Issuing, in ONE
control-plane transaction with the customer's row locked (``FOR UPDATE`` on PostgreSQL; SQLite
serialises writers):

1. if the month is already issued, return that invoice (issuing is idempotent);
2. compute the draft with the balance read under the lock, and what every earlier issued invoice
   billed (for adjustment lines, see :mod:`.invoice`);
3. give it the next number of its month (``INV-YYYYMM-NNNNN``, unique; a concurrent issuer that
   took the same number makes this transaction fail and retry with the next one);
4. store the document and what it billed per usage month (``billing_invoice_usage``), and move
   the customer's credit balance by ``credit_added - credits_applied``.

Because the invoice row (unique per customer and month) and the balance change commit together,
credits are consumed exactly once however many times, or how concurrently, a month is issued.
Tables: ``billing/migrations/versions/billing_0001_invoices.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Float, Index, String, Text, UniqueConstraint, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from ..core.clock import SYSTEM_CLOCK, Clock
from ..core.errors import IllegalTransition, NotFound, Unavailable
from ..store import controlplane as cp
from ..store import db
from .invoice import ISSUED, Invoice, check_month

_RETRIES = 8


class IssuedInvoiceRow(db.Base):
    __tablename__ = "billing_invoices"
    __table_args__ = (
        UniqueConstraint("customer_id", "month", name="uq_billing_invoices_customer_month"),
    )

    number: Mapped[str] = mapped_column(String(32), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(40))
    month: Mapped[str] = mapped_column(String(7))
    issued_at: Mapped[float] = mapped_column(Float)
    # money as exact decimal strings (SQLite has no exact NUMERIC)
    total: Mapped[str] = mapped_column(String(32))
    credits_applied: Mapped[str] = mapped_column(String(32))
    credit_added: Mapped[str] = mapped_column(String(32))
    document: Mapped[str] = mapped_column(Text)


class InvoiceUsageRow(db.Base):
    """What an issued invoice billed for one usage month (its own, or an earlier one it
    adjusts), per pricing version, tier and item: integer base units and the amount."""

    __tablename__ = "billing_invoice_usage"
    __table_args__ = (Index("ix_billing_invoice_usage_customer", "customer_id", "period"),)

    number: Mapped[str] = mapped_column(String(32), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(40))
    period: Mapped[str] = mapped_column(String(7), primary_key=True)
    pricing_version: Mapped[str] = mapped_column(String(16), primary_key=True)
    tier: Mapped[str] = mapped_column(String(32), primary_key=True)
    item: Mapped[str] = mapped_column(String(16), primary_key=True)
    usage: Mapped[str] = mapped_column(String(48))
    amount: Mapped[str] = mapped_column(String(32))


@dataclass(frozen=True, slots=True)
class Billed:
    """One thing an invoice bills: ``usage`` base units of ``item`` in month ``period``."""

    period: str
    pricing_version: str
    tier: str
    item: str
    usage: int
    amount: Decimal


# period -> (pricing_version, tier, item) -> (usage, amount) billed so far by issued invoices
BilledSoFar = dict[str, dict[tuple[str, str, str], tuple[int, Decimal]]]
Draft = Callable[[Decimal, BilledSoFar], tuple[Invoice, list[Billed]]]


def month_end(month: str) -> datetime:
    year, mon = check_month(month)
    return datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=UTC)


class InvoiceLedger:
    """Issued invoices in the control-plane database."""

    def __init__(self, factory: sessionmaker[Session], clock: Clock = SYSTEM_CLOCK) -> None:
        self._factory = factory
        self._clock = clock
        # SQLite has no row locks: one issuer per process at a time (another process's write
        # makes ours fail and retry). PostgreSQL: the customer row's FOR UPDATE serialises.
        bind = factory.kw.get("bind")
        sqlite = bind is None or bind.dialect.name == "sqlite"
        self._lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if sqlite else contextlib.nullcontext()
        )

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        with self._factory() as s:
            yield s

    def issued(self, customer_id: str, month: str) -> Invoice | None:
        """The issued invoice of a customer-month, or None while it is a draft."""
        with self._session() as s:
            row = s.scalars(
                select(IssuedInvoiceRow).where(
                    IssuedInvoiceRow.customer_id == customer_id, IssuedInvoiceRow.month == month
                )
            ).first()
            return None if row is None else Invoice.from_json(json.loads(row.document))

    def list_issued(self, customer_id: str) -> list[Invoice]:
        """A customer's issued invoices, oldest month first."""
        with self._session() as s:
            rows = s.scalars(
                select(IssuedInvoiceRow)
                .where(IssuedInvoiceRow.customer_id == customer_id)
                .order_by(IssuedInvoiceRow.month)
            )
            return [Invoice.from_json(json.loads(r.document)) for r in rows]

    def balance(self, customer_id: str) -> Decimal:
        """The customer's credit balance now (not cached: issuing changes it)."""
        with self._session() as s:
            return cp.get_customer(s, customer_id).credit_balance

    def billed(self, customer_id: str) -> BilledSoFar:
        with self._session() as s:
            return _billed(s, customer_id)

    def issue(self, customer_id: str, month: str, draft: Draft) -> tuple[Invoice, bool]:
        """Issue the month's invoice (``draft(balance, billed_so_far)`` computes it); returns
        the invoice and whether this call issued it (False: it was issued before)."""
        end = month_end(month)
        now = self._clock.now().astimezone(UTC)
        if now < end:
            raise IllegalTransition(
                f"the invoice of {customer_id} for {month} cannot be issued before the month "
                f"is over ({end.isoformat()})",
                suggestion="issue it once the month has ended; until then it is a draft",
            )
        for _ in range(_RETRIES):
            try:
                with self._lock, db.transaction(self._factory) as s:
                    return self._issue(s, customer_id, month, draft, now)
            except IntegrityError:
                continue  # another issuer took the number (or the month): look again
        raise Unavailable(
            f"could not issue the invoice of {customer_id} for {month}: too many concurrent "
            "issuers",
            retryable=True,
        )

    def _issue(
        self, s: Session, customer_id: str, month: str, draft: Draft, now: datetime
    ) -> tuple[Invoice, bool]:
        row = s.get(cp.CustomerRow, customer_id, with_for_update=True)
        if row is None:
            raise NotFound(f"customer {customer_id} not found")
        done = s.scalars(
            select(IssuedInvoiceRow).where(
                IssuedInvoiceRow.customer_id == customer_id, IssuedInvoiceRow.month == month
            )
        ).first()
        if done is not None:
            return Invoice.from_json(json.loads(done.document)), False
        balance = Decimal(row.credit_balance)
        inv, billed = draft(balance, _billed(s, customer_id))
        n = s.scalar(
            select(func.count())
            .select_from(IssuedInvoiceRow)
            .where(IssuedInvoiceRow.month == month)
        )
        number = f"INV-{month.replace('-', '')}-{int(n or 0) + 1:05d}"
        inv = dataclasses.replace(
            inv, status=ISSUED, number=number, issued_at=now.isoformat(timespec="seconds")
        )
        s.add(
            IssuedInvoiceRow(
                number=number,
                customer_id=customer_id,
                month=month,
                issued_at=now.timestamp(),
                total=str(inv.total),
                credits_applied=str(inv.credits_applied),
                credit_added=str(inv.credit_added),
                document=json.dumps(inv.to_json(), sort_keys=True),
            )
        )
        s.add_all(
            InvoiceUsageRow(
                number=number,
                customer_id=customer_id,
                period=b.period,
                pricing_version=b.pricing_version,
                tier=b.tier,
                item=b.item,
                usage=str(b.usage),
                amount=str(b.amount),
            )
            for b in billed
        )
        s.flush()  # a duplicate number/month fails here, before the balance moves
        change = inv.credit_added - inv.credits_applied
        if change:
            cp.update_customer(s, customer_id, now=now.timestamp(), add_credits=change)
        return inv, True


def _billed(s: Session, customer_id: str) -> BilledSoFar:
    out: BilledSoFar = defaultdict(dict)
    rows = s.scalars(select(InvoiceUsageRow).where(InvoiceUsageRow.customer_id == customer_id))
    for r in rows:
        key = (r.pricing_version, r.tier, r.item)
        usage, amount = out[r.period].get(key, (0, Decimal("0.00")))
        out[r.period][key] = (usage + int(r.usage), amount + Decimal(r.amount))
    return dict(out)
