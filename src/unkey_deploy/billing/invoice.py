"""An invoice per customer-month (BILLING.md "Per customer-month"), as JSON and as HTML.

An invoice is a **draft** (recomputed from ``billing_hourly`` on every read) until it is
**issued** (:mod:`.ledger`): then it has a number and its document is frozen. Usage of an issued
month that changes later (a late or corrected batch) is billed on the next invoice issued for a
later month as **adjustment** lines (``adjustment_for`` = the corrected month), each the
difference between what the month's usage costs now and what was billed for it already, so the
amounts billed for a month always add up to what one invoice over its final usage would show.
See docs/billing.md."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from ..core.errors import InvalidInput
from . import pricing as p


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Summed integer usage of one customer-month under one (pricing version, tier)."""

    pricing_version: str
    tier: str
    cpu_ns: int = 0
    mem_byte_ns: int = 0
    net_bytes: int = 0
    storage_byte_ns: int = 0
    gap_ns: int = 0


@dataclass(frozen=True, slots=True)
class Line:
    item: str
    unit: str
    quantity: Decimal  # shown with 6 decimals; the amount is priced from the exact quantity
    unit_price: Decimal
    amount: Decimal
    pricing_version: str
    tier: str
    adjustment_for: str | None = None  # the earlier, issued month this line corrects

    def to_json(self) -> dict[str, Any]:
        out = {
            "item": self.item,
            "unit": self.unit,
            "quantity": str(self.quantity),
            "unit_price": str(self.unit_price),
            "amount": str(self.amount),
            "pricing_version": self.pricing_version,
            "tier": self.tier,
        }
        if self.adjustment_for is not None:
            out["adjustment_for"] = self.adjustment_for
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Line:
        return cls(
            item=str(d["item"]),
            unit=str(d["unit"]),
            quantity=Decimal(d["quantity"]),
            unit_price=Decimal(d["unit_price"]),
            amount=Decimal(d["amount"]),
            pricing_version=str(d["pricing_version"]),
            tier=str(d["tier"]),
            adjustment_for=d.get("adjustment_for"),
        )


DRAFT = "draft"
ISSUED = "issued"


@dataclass(frozen=True, slots=True)
class Invoice:
    customer_id: str
    month: str  # YYYY-MM
    currency: str
    lines: tuple[Line, ...]
    subtotal: Decimal
    discount_pct: Decimal
    discount: Decimal
    credit_balance: Decimal
    credits_applied: Decimal
    total: Decimal
    # a negative net (adjustments larger than the month's usage) is owed to the customer: the
    # invoice's total is 0 and the amount goes to the credit balance when the invoice is issued
    credit_added: Decimal = Decimal("0.00")
    status: str = DRAFT  # draft | issued
    number: str | None = None
    issued_at: str | None = None  # ISO 8601 UTC

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "month": self.month,
            "status": self.status,
            "number": self.number,
            "issued_at": self.issued_at,
            "currency": self.currency,
            "lines": [ln.to_json() for ln in self.lines],
            "subtotal": str(self.subtotal),
            "discount_pct": str(self.discount_pct),
            "discount": str(self.discount),
            "credit_balance": str(self.credit_balance),
            "credits_applied": str(self.credits_applied),
            "credit_added": str(self.credit_added),
            "total": str(self.total),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Invoice:
        return cls(
            customer_id=str(d["customer_id"]),
            month=str(d["month"]),
            currency=str(d["currency"]),
            lines=tuple(Line.from_json(x) for x in d["lines"]),
            subtotal=Decimal(d["subtotal"]),
            discount_pct=Decimal(d["discount_pct"]),
            discount=Decimal(d["discount"]),
            credit_balance=Decimal(d["credit_balance"]),
            credits_applied=Decimal(d["credits_applied"]),
            total=Decimal(d["total"]),
            credit_added=Decimal(d.get("credit_added", "0.00")),
            status=str(d.get("status", DRAFT)),
            number=d.get("number"),
            issued_at=d.get("issued_at"),
        )


def check_month(month: str) -> tuple[int, int]:
    """(year, month) of ``YYYY-MM``, a month whose end is a date too (0001-01 .. 9999-11)."""
    try:
        y, m = month.split("-")
        year, mon = int(y), int(m)
        if len(y) != 4 or len(m) != 2 or not 1 <= mon <= 12:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"month {month!r} is not YYYY-MM", suggestion="e.g. 2026-11") from None
    if not (1, 1) <= (year, mon) <= (9999, 11):
        raise InvalidInput(
            f"month {month!r} is out of range: YYYY-MM from 0001-01 to 9999-11",
            suggestion="e.g. 2026-11",
        )
    return year, mon


_ITEMS = (
    ("vcpu", "vCPU-hours", "vcpu_hour"),
    ("memory", "GB-hours", "memory_gb_hour"),
    ("network", "GB", "network_gb"),
    ("storage", "GB-hours", "storage_gb_hour"),
)
ITEMS = tuple(i for i, _u, _a in _ITEMS)
_Q6 = Decimal("0.000001")


def usage_of(t: UsageTotals, item: str) -> int:
    """The integer base units an item is priced from (ns, byte x ns, bytes)."""
    return {
        "vcpu": t.cpu_ns,
        "memory": t.mem_byte_ns,
        "network": t.net_bytes,
        "storage": t.storage_byte_ns,
    }[item]


def quantity_of(item: str, usage: int) -> Fraction:
    """The exact priced quantity of ``usage`` base units of ``item``."""
    return {
        "vcpu": p.vcpu_hours,
        "memory": p.memory_gb_hours,
        "network": p.network_gb,
        "storage": p.storage_gb_hours,
    }[item](usage)


def price_of(item: str, sheet: p.PriceSheet) -> Decimal:
    attr = {i: a for i, _u, a in _ITEMS}[item]
    price: Decimal = getattr(sheet, attr)
    return price


def unit_of(item: str) -> str:
    return {i: u for i, u, _a in _ITEMS}[item]


def amount_of(item: str, usage: int, sheet: p.PriceSheet) -> Decimal:
    """A line's amount: exact quantity x price, rounded half-even to cents once."""
    return p.to_decimal(quantity_of(item, usage) * Fraction(price_of(item, sheet)), p.CENT)


def usage_lines(totals: list[UsageTotals]) -> list[Line]:
    """The lines of a month's own usage (storage only when used)."""
    lines: list[Line] = []
    for t in sorted(totals, key=lambda t: (t.pricing_version, t.tier)):
        sheet = p.price_sheet(t.pricing_version, t.tier)
        for item, unit, _attr in _ITEMS:
            usage = usage_of(t, item)
            if item == "storage" and usage == 0:
                continue
            lines.append(
                Line(
                    item=item,
                    unit=unit,
                    quantity=p.to_decimal(quantity_of(item, usage), _Q6),
                    unit_price=price_of(item, sheet),
                    amount=amount_of(item, usage, sheet),
                    pricing_version=t.pricing_version,
                    tier=t.tier,
                )
            )
    return lines


def build_invoice(
    customer_id: str,
    month: str,
    totals: list[UsageTotals],
    *,
    discount_pct: Decimal,
    credit_balance: Decimal,
    adjustments: Sequence[Line] = (),
) -> Invoice:
    """A draft invoice: the month's usage lines, then ``adjustments`` (of earlier issued
    months), discount on the whole subtotal, then credits (BILLING.md "Per customer-month")."""
    check_month(month)
    lines = [*usage_lines(totals), *adjustments]
    subtotal = sum((ln.amount for ln in lines), Decimal("0.00"))
    discount = p.round_cents(subtotal * discount_pct / 100)
    credits = min(credit_balance, subtotal - discount)
    credits = max(credits, Decimal(0))
    if credits == credits.quantize(p.CENT):  # the usual case: show cents, not the 6-place balance
        credits = credits.quantize(p.CENT)
    total = subtotal - discount - credits
    credit_added = Decimal("0.00")
    if total < 0:
        credit_added, total = -total, Decimal("0.00")
    return Invoice(
        customer_id=customer_id,
        month=month,
        currency="USD",
        lines=tuple(lines),
        subtotal=subtotal,
        discount_pct=discount_pct,
        discount=discount,
        credit_balance=credit_balance,
        credits_applied=credits,
        total=total,
        credit_added=credit_added,
    )


def to_html(inv: Invoice) -> str:
    """A self-contained, printable HTML document."""
    e = html.escape

    def label(ln: Line) -> str:
        what = f"{e(ln.item)} ({e(ln.pricing_version)}, {e(ln.tier)})"
        if ln.adjustment_for is not None:
            what = f"adjustment for {e(ln.adjustment_for)}: {what}"
        return what

    if inv.status == ISSUED:
        head = f"Invoice {e(inv.number or '')}, issued {e((inv.issued_at or '')[:10])}"
    else:
        head = "Draft invoice (not issued; usage may still change)"
    credit_note = (
        f"<tr><td colspan=3>Added to your credit balance</td><td class=n>${inv.credit_added}</td>"
        "</tr>"
        if inv.credit_added
        else ""
    )
    rows = "\n".join(
        f"<tr><td>{label(ln)}</td>"
        f"<td class=n>{ln.quantity} {e(ln.unit)}</td><td class=n>${ln.unit_price}</td>"
        f"<td class=n>${ln.amount}</td></tr>"
        for ln in inv.lines
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Invoice {e(inv.customer_id)} {e(inv.month)}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;color:#111}}
table{{width:100%;border-collapse:collapse}} td,th{{padding:.4rem;border-bottom:1px solid #ddd}}
th{{text-align:left}} .n{{text-align:right;font-variant-numeric:tabular-nums}}
tfoot td{{border:none}} .total td{{font-weight:bold;border-top:2px solid #111}}
</style></head><body>
<h1>{head}</h1>
<p>Customer <strong>{e(inv.customer_id)}</strong> &middot; period <strong>{e(inv.month)}</strong>
(UTC) &middot; currency {e(inv.currency)}</p>
<table>
<thead><tr><th>Item</th><th class=n>Quantity</th><th class=n>Unit price</th>
<th class=n>Amount</th></tr></thead>
<tbody>
{rows}
</tbody>
<tfoot>
<tr><td colspan=3>Subtotal</td><td class=n>${inv.subtotal}</td></tr>
<tr><td colspan=3>Discount ({inv.discount_pct}%)</td><td class=n>-${inv.discount}</td></tr>
<tr><td colspan=3>Credits applied (balance ${inv.credit_balance})</td>
<td class=n>-${inv.credits_applied}</td></tr>
<tr class=total><td colspan=3>Total</td><td class=n>${inv.total}</td></tr>
{credit_note}
</tfoot></table>
<p><small>GB = 2<sup>30</sup> bytes. Usage is measured every 100 ms; gaps over 1 s in
measurement are not billed. Each line is rounded once, half-even, to the cent.</small></p>
</body></html>
"""
