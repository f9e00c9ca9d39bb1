"""Pricing rules as versioned data, in exact arithmetic.

A price sheet never changes once published: a change is a new version (BILLING.md). Quantities
stay in integer base units (CPU ns, memory byte x ns, network bytes) until an invoice line turns
them into money, so a sum over many hours is exact and rounding happens once, on the line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

from ..core.errors import InvalidInput

NS_PER_HOUR = 3_600_000_000_000
NS_PER_S = 1_000_000_000
GIB = 1 << 30  # "GB" everywhere in billing (the design's queries divide by 1073741824)
CENT = Decimal("0.01")
COST_SCALE = Decimal("0.000000000001")  # billing_hourly.cost is Decimal(38, 12)


@dataclass(frozen=True, slots=True)
class PriceSheet:
    """USD prices of one (version, tier)."""

    version: str
    tier: str
    vcpu_hour: Decimal
    memory_gb_hour: Decimal
    network_gb: Decimal
    storage_gb_hour: Decimal = Decimal(0)


_V1 = {
    "vcpu_hour": Decimal("0.05"),
    "memory_gb_hour": Decimal("0.01"),
    "network_gb": Decimal("0.10"),
    "storage_gb_hour": Decimal(0),
}
# v1: the design's defaults, the same for every tier (tiers exist so a later version can differ).
PRICING: dict[str, dict[str, PriceSheet]] = {
    "v1": {
        tier: PriceSheet(version="v1", tier=tier, **_V1)
        for tier in ("free", "standard", "pro", "enterprise")
    }
}


def price_sheet(version: str, tier: str) -> PriceSheet:
    try:
        return PRICING[version][tier]
    except KeyError:
        raise InvalidInput(
            f"no price sheet for pricing version {version!r}, tier {tier!r}",
            suggestion=f"known versions: {', '.join(sorted(PRICING))}",
        ) from None


# --- quantities in exact rational units --------------------------------------------------------


def vcpu_hours(cpu_ns: int) -> Fraction:
    return Fraction(cpu_ns, NS_PER_HOUR)


def memory_gb_hours(mem_byte_ns: int) -> Fraction:
    return Fraction(mem_byte_ns, GIB * NS_PER_HOUR)


def network_gb(net_bytes: int) -> Fraction:
    return Fraction(net_bytes, GIB)


def storage_gb_hours(storage_byte_ns: int) -> Fraction:
    return Fraction(storage_byte_ns, GIB * NS_PER_HOUR)


def to_decimal(value: Fraction, quantum: Decimal) -> Decimal:
    """Round an exact rational half-even to ``quantum`` (e.g. cents), once."""
    exp = quantum.as_tuple().exponent
    if not isinstance(exp, int):
        raise InvalidInput(f"quantum {quantum} is not a finite decimal")
    scale = 10 ** (-exp)
    scaled = value * scale
    q, r = divmod(scaled.numerator, scaled.denominator)
    twice = 2 * r
    if twice > scaled.denominator or (twice == scaled.denominator and q % 2 == 1):
        q += 1
    return (Decimal(q) / Decimal(scale)).quantize(quantum)


def round_cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_EVEN)


def _half_even_div(num: int, den: int) -> int:
    q, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and q % 2 == 1):
        q += 1
    return q


def hour_cost(
    sheet: PriceSheet, cpu_ns: int, mem_byte_ns: int, net_bytes: int, storage_byte_ns: int = 0
) -> Decimal:
    """The unrounded cost of one VM-hour, stored with 12 decimals (display only: invoices are
    priced from summed quantities, not from summed costs). Integer arithmetic over one common
    denominator: exact, and ~10x cheaper than Fractions on the aggregator's path."""
    terms = (
        (cpu_ns, sheet.vcpu_hour, NS_PER_HOUR),
        (mem_byte_ns, sheet.memory_gb_hour, GIB * NS_PER_HOUR),
        (net_bytes, sheet.network_gb, GIB),
        (storage_byte_ns, sheet.storage_gb_hour, GIB * NS_PER_HOUR),
    )
    ratios = [price.as_integer_ratio() for _q, price, _u in terms]
    den = math.lcm(*(unit * pd for (_q, _p, unit), (_pn, pd) in zip(terms, ratios, strict=True)))
    num = sum(
        qty * pn * (den // (unit * pd))
        for (qty, _p, unit), (pn, pd) in zip(terms, ratios, strict=True)
    )
    scale = 10**12
    return Decimal(_half_even_div(num * scale, den)).scaleb(-12).quantize(COST_SCALE)
