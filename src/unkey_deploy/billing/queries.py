"""Read side of billing for everyone (gatewayd, the CLI through it): invoices, usage, the
design's three queries. Tenant scoping is the caller's principal: every customer-facing method
takes the customer id from it, never from the request."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ..clickhouse import queries as chq
from ..clickhouse.api import Storage
from ..core.clock import Clock
from ..core.errors import NotFound, Unavailable
from . import pricing
from .customers import CustomerDirectory, CustomerInfo
from .invoice import (
    ITEMS,
    Invoice,
    Line,
    UsageTotals,
    amount_of,
    build_invoice,
    check_month,
    price_of,
    quantity_of,
    unit_of,
    usage_of,
)
from .ledger import Billed, BilledSoFar, InvoiceLedger

# usage per month and price sheet, from the same scope as the monthly bill (chq.SQL_MONTHLY).
# UInt64 columns are summed as Decimal128: ClickHouse's sum() of a UInt64 is a UInt64 and wraps
# past 2^64 (a month of ~7,000 busy vCPUs is more CPU ns than that).
SQL_INVOICE_TOTALS = chq.BILLING_SCOPE.sql(
    """
    formatDateTime(toStartOfMonth(hour), '%Y-%m') AS month,
    pricing_version,
    toString(sum(toDecimal128(cpu_time_ns, 0))) AS cpu_time_ns,
    toString(sum(mem_byte_ns)) AS mem_byte_ns,
    toString(sum(toDecimal128(net_rx_bytes, 0)) + sum(toDecimal128(net_tx_bytes, 0))) AS net_bytes,
    toString(sum(storage_byte_ns)) AS storage_byte_ns,
    toString(sum(toDecimal128(gap_ns, 0))) AS gap_ns""",
    "GROUP BY month, pricing_version\nORDER BY month, pricing_version",
)

_Q6 = Decimal("0.000001")


def _sheet(t: UsageTotals) -> pricing.PriceSheet:
    return pricing.price_sheet(t.pricing_version, t.tier)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)  # Decimal


@dataclass
class BillingQueries:
    storage: Storage
    directory: CustomerDirectory
    clock: Clock
    # issued invoices (control-plane database); without it every invoice is a draft
    ledger: InvoiceLedger | None = None

    def _customer(self, customer_id: str) -> CustomerInfo:
        cust = self.directory.customer(customer_id)
        if cust is None:
            raise NotFound(f"customer {customer_id} not found")
        return cust

    def invoice(self, customer_id: str, month: str) -> Invoice:
        """The issued invoice of the month (frozen), else its draft as it would be issued now
        (the month's usage, plus adjustments of earlier issued months)."""
        check_month(month)
        cust = self._customer(customer_id)
        if self.ledger is None:
            inv, _billed = self._draft(cust, month, cust.credit_balance, {})
            return inv
        issued = self.ledger.issued(customer_id, month)
        if issued is not None:
            return issued
        balance = self.ledger.balance(customer_id)
        inv, _billed = self._draft(cust, month, balance, self.ledger.billed(customer_id))
        return inv

    def issue(self, customer_id: str, month: str) -> tuple[Invoice, bool]:
        """Issue (finalise) a customer-month invoice; see :mod:`.ledger`. Returns the invoice
        and whether this call issued it."""
        check_month(month)
        cust = self._customer(customer_id)
        if self.ledger is None:
            raise Unavailable("invoices cannot be issued: no control-plane database configured")
        return self.ledger.issue(
            customer_id, month, lambda bal, billed: self._draft(cust, month, bal, billed)
        )

    def issued_invoices(self, customer_id: str) -> list[Invoice]:
        self._customer(customer_id)
        return [] if self.ledger is None else self.ledger.list_issued(customer_id)

    def _draft(
        self, cust: CustomerInfo, month: str, balance: Decimal, billed: BilledSoFar
    ) -> tuple[Invoice, list[Billed]]:
        periods = sorted(p for p in billed if p < month)
        by_month = self._totals(cust.customer_id, [*periods, month], cust.pricing_tier)
        totals = by_month[month]
        rows = [
            Billed(
                month,
                t.pricing_version,
                t.tier,
                item,
                usage_of(t, item),
                amount_of(item, usage_of(t, item), _sheet(t)),
            )
            for t in totals
            for item in ITEMS
        ]
        adjustments: list[Line] = []
        for period in periods:
            before = billed[period]
            tier_of = {v: tier for v, tier, _item in before}  # as priced when issued
            now = {t.pricing_version: t for t in by_month[period]}
            keys = set(before) | {
                (v, tier_of.get(v, cust.pricing_tier), item) for v in now for item in ITEMS
            }
            for v, tier, item in sorted(keys, key=lambda k: (k[0], k[1], ITEMS.index(k[2]))):
                cur = usage_of(now[v], item) if v in now else 0
                was_usage, was_amount = before.get((v, tier, item), (0, Decimal("0.00")))
                if cur == was_usage:
                    continue
                sheet = pricing.price_sheet(v, tier)
                amount = amount_of(item, cur, sheet) - was_amount
                adjustments.append(
                    Line(
                        item=item,
                        unit=unit_of(item),
                        quantity=pricing.to_decimal(quantity_of(item, cur - was_usage), _Q6),
                        unit_price=price_of(item, sheet),
                        amount=amount,
                        pricing_version=v,
                        tier=tier,
                        adjustment_for=period,
                    )
                )
                rows.append(Billed(period, v, tier, item, cur - was_usage, amount))
        inv = build_invoice(
            cust.customer_id,
            month,
            totals,
            discount_pct=cust.discount_pct,
            credit_balance=balance,
            adjustments=adjustments,
        )
        return inv, rows

    def _totals(
        self, customer_id: str, months: list[str], tier: str
    ) -> dict[str, list[UsageTotals]]:
        """Usage totals of each of ``months`` (one query over the range they span)."""
        start, _end = chq.month_bounds(min(months))
        _start, end = chq.month_bounds(max(months))
        rows = self.storage.query(
            SQL_INVOICE_TOTALS,
            chq.BILLING_SCOPE.params(customer_id=customer_id, start=start, end=end),
        )
        out: dict[str, list[UsageTotals]] = {m: [] for m in months}
        for r in rows:
            if str(r["month"]) in out:
                out[str(r["month"])].append(
                    UsageTotals(
                        pricing_version=str(r["pricing_version"]),
                        tier=tier,
                        cpu_ns=int(r["cpu_time_ns"]),
                        mem_byte_ns=int(r["mem_byte_ns"]),
                        net_bytes=int(r["net_bytes"]),
                        storage_byte_ns=int(r["storage_byte_ns"]),
                        gap_ns=int(r["gap_ns"]),
                    )
                )
        return out

    def current_month(self) -> str:
        return self.clock.now().astimezone(UTC).strftime("%Y-%m")

    def dashboard(self, customer_id: str) -> list[dict[str, Any]]:
        now = self.clock.now().astimezone(UTC)
        return [
            _jsonable(asdict(v))
            for v in chq.dashboard(self.storage, customer_id=customer_id, now=now)
        ]

    def usage(
        self, customer_id: str, *, vm_id: str | None = None, since_s: float = 3600.0
    ) -> dict[str, Any]:
        now = self.clock.now().astimezone(UTC)
        start = now - timedelta(seconds=since_s)
        points = chq.vm_usage(
            self.storage, customer_id=customer_id, vm_id=vm_id, start=start, end=now
        )
        return {
            "customer_id": customer_id,
            "vm_id": vm_id,
            "since": start.isoformat(),
            "until": now.isoformat(),
            "vms": self.dashboard(customer_id),
            "points": [_jsonable(asdict(p)) for p in points],
        }

    def capacity(self, *, days: int = 7) -> list[dict[str, Any]]:
        now = self.clock.now().astimezone(UTC)
        rows = chq.capacity_planning(
            self.storage, start=now - timedelta(days=days), end=now, customer_id=None
        )
        return [_jsonable(asdict(r)) for r in rows]
