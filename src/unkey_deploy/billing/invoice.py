"""An invoice per customer-month (BILLING.md "Per customer-month"), as JSON and as HTML."""

from __future__ import annotations

import html
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

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "month": self.month,
            "currency": self.currency,
            "lines": [
                {
                    "item": ln.item,
                    "unit": ln.unit,
                    "quantity": str(ln.quantity),
                    "unit_price": str(ln.unit_price),
                    "amount": str(ln.amount),
                    "pricing_version": ln.pricing_version,
                    "tier": ln.tier,
                }
                for ln in self.lines
            ],
            "subtotal": str(self.subtotal),
            "discount_pct": str(self.discount_pct),
            "discount": str(self.discount),
            "credit_balance": str(self.credit_balance),
            "credits_applied": str(self.credits_applied),
            "total": str(self.total),
        }


def check_month(month: str) -> tuple[int, int]:
    try:
        y, m = month.split("-")
        year, mon = int(y), int(m)
        if len(y) != 4 or len(m) != 2 or not 1 <= mon <= 12:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"month {month!r} is not YYYY-MM", suggestion="e.g. 2026-11") from None
    return year, mon


_ITEMS = (
    ("vcpu", "vCPU-hours", "vcpu_hour"),
    ("memory", "GB-hours", "memory_gb_hour"),
    ("network", "GB", "network_gb"),
    ("storage", "GB-hours", "storage_gb_hour"),
)
_Q6 = Decimal("0.000001")


def build_invoice(
    customer_id: str,
    month: str,
    totals: list[UsageTotals],
    *,
    discount_pct: Decimal,
    credit_balance: Decimal,
) -> Invoice:
    check_month(month)
    lines: list[Line] = []
    for t in sorted(totals, key=lambda t: (t.pricing_version, t.tier)):
        sheet = p.price_sheet(t.pricing_version, t.tier)
        quantities = {
            "vcpu": p.vcpu_hours(t.cpu_ns),
            "memory": p.memory_gb_hours(t.mem_byte_ns),
            "network": p.network_gb(t.net_bytes),
            "storage": p.storage_gb_hours(t.storage_byte_ns),
        }
        for item, unit, price_attr in _ITEMS:
            price: Decimal = getattr(sheet, price_attr)
            qty = quantities[item]
            if item == "storage" and qty == 0:
                continue
            lines.append(
                Line(
                    item=item,
                    unit=unit,
                    quantity=p.to_decimal(qty, _Q6),
                    unit_price=price,
                    amount=p.to_decimal(qty * Fraction(price), p.CENT),
                    pricing_version=t.pricing_version,
                    tier=t.tier,
                )
            )
    subtotal = sum((ln.amount for ln in lines), Decimal("0.00"))
    discount = p.round_cents(subtotal * discount_pct / 100)
    credits = min(credit_balance, subtotal - discount)
    credits = max(credits, Decimal(0))
    if credits == credits.quantize(p.CENT):  # the usual case: show cents, not the 6-place balance
        credits = credits.quantize(p.CENT)
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
        total=subtotal - discount - credits,
    )


def to_html(inv: Invoice) -> str:
    """A self-contained, printable HTML document."""
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(ln.item)} ({e(ln.pricing_version)}, {e(ln.tier)})</td>"
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
<h1>Invoice</h1>
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
</tfoot></table>
<p><small>GB = 2<sup>30</sup> bytes. Usage is measured every 100 ms; gaps over 1 s in
measurement are not billed. Each line is rounded once, half-even, to the cent.</small></p>
</body></html>
"""
