"""BILLING.md as pure functions, checked against the independent reference."""

from __future__ import annotations

import random
from collections import defaultdict
from decimal import Decimal
from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from unkey_deploy.billing import pricing
from unkey_deploy.billing.invoice import UsageTotals, build_invoice, to_html
from unkey_deploy.billing.usage import REASON_CPU, REASON_MEMORY, HourUsage, clean
from unkey_deploy.metering.codec import samples_to_array

from .reference import month_of_hour, reference_invoices
from .scenarios import MONTH_EDGE_NS, Series, make_series, raw_of

HOUR = 3_600_000_000_000


def _month(hour: int) -> str:
    return month_of_hour(hour * HOUR)


def pure_invoices(
    series: list[Series], customers: dict[str, tuple[Decimal, Decimal]], *, chunk: int = 0
) -> dict[tuple[str, str], dict[str, Decimal]]:
    """Series -> clean (whole, or chained in chunks) -> hour usage -> invoices."""
    per: dict[tuple[str, str], HourUsage] = defaultdict(HourUsage)
    for s in series:
        arr = samples_to_array(s.samples)
        parts = [arr] if not chunk else [arr[i : i + chunk] for i in range(0, len(arr), chunk)]
        prev = None
        for part in parts:
            c = clean(prev, part, s.key.vcpus, s.key.memory_total_bytes)
            prev = c.last
            for hour, u in c.hours.items():
                per[(s.key.customer_id, _month(hour))].add(u)
    out = {}
    for (cust, month), u in per.items():
        pct, bal = customers[cust]
        inv = build_invoice(
            cust,
            month,
            [UsageTotals("v1", "standard", u.cpu_ns, u.mem_byte_ns, u.net_bytes)],
            discount_pct=pct,
            credit_balance=bal,
        )
        out[(cust, month)] = {
            **{ln.item: ln.amount for ln in inv.lines},
            "subtotal": inv.subtotal,
            "discount": inv.discount,
            "credits": inv.credits_applied,
            "total": inv.total,
        }
    return out


def assert_equal_to_reference(
    series: list[Series],
    customers: dict[str, tuple[Decimal, Decimal]],
    got: dict[tuple[str, str], dict[str, Decimal]],
) -> None:
    ref = reference_invoices(
        raw_of(series), {c: (Fraction(p), Fraction(b)) for c, (p, b) in customers.items()}
    )
    assert set(got) == set(ref)
    for k, r in ref.items():
        g = got[k]
        for item, cents in r["lines"].items():
            assert Fraction(g[item]) == cents, (k, item)
        for f in ("subtotal", "discount", "credits", "total"):
            assert Fraction(g[f]) == r[f], (k, f, g[f], r[f])


def test_month_boundary_gaps_invalid_and_restarts_match_reference() -> None:
    rng = random.Random(7)
    series = [
        make_series(
            rng, "cust_a", "vm_1", "i1", MONTH_EDGE_NS, 3000, gap_every=400, invalid_every=97
        ),
        # the same VM restarted: a new instance, counters from 0 again
        make_series(rng, "cust_a", "vm_1", "i2", MONTH_EDGE_NS + 400 * 10**9, 1500),
        make_series(
            rng,
            "cust_b",
            "vm_2",
            "i1",
            MONTH_EDGE_NS - 2 * HOUR,
            2500,
            vcpus=4,
            mem_total=8 * 2**30,
            invalid_every=50,
        ),
    ]
    customers = {"cust_a": (Decimal("12.50"), Decimal("0.02")), "cust_b": (Decimal(0), Decimal(5))}
    got = pure_invoices(series, customers)
    assert {m for _c, m in got} == {"2026-10", "2026-11"}  # both sides of the month edge billed
    assert_equal_to_reference(series, customers, got)
    # chaining batch by batch (the aggregator's fast path) gives the same invoice
    assert pure_invoices(series, customers, chunk=600) == got
    assert pure_invoices(series, customers, chunk=37) == got


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 1500),
    gap_every=st.sampled_from([0, 3, 50, 700]),
    invalid_every=st.sampled_from([0, 2, 13, 300]),
    start_offset_s=st.integers(-7200, 3600),
    pct=st.decimals(0, 100, places=2),
    balance=st.decimals(0, 3, places=6),
    chunk=st.integers(0, 700),
)
def test_any_series_matches_reference(  # noqa: PLR0917
    seed: int,
    n: int,
    gap_every: int,
    invalid_every: int,
    start_offset_s: int,
    pct: Decimal,
    balance: Decimal,
    chunk: int,
) -> None:
    rng = random.Random(seed)
    series = [
        make_series(
            rng,
            "cust_h",
            "vm_h",
            "i1",
            MONTH_EDGE_NS + start_offset_s * 10**9,
            n,
            vcpus=rng.choice([1, 2, 8]),
            gap_every=gap_every,
            invalid_every=invalid_every,
        )
    ]
    customers = {"cust_h": (pct, balance)}
    assert_equal_to_reference(series, customers, pure_invoices(series, customers, chunk=chunk))


def test_invalid_samples_are_not_billed_and_next_delta_is_against_last_valid() -> None:
    s = 1_000_000_000
    rows = np.array(
        [
            # t, cpu, mem, rx, tx, dr, dw
            [10 * s, 0, 100, 0, 0, 0, 0],
            [10 * s + s // 10, 10**9, 100, 0, 0, 0, 0],  # 1000 % of 1 vCPU: invalid
            [10 * s + 2 * s // 10, 5 * 10**7, 200, 10, 0, 0, 0],  # valid vs the first
            [10 * s + 3 * s // 10, 6 * 10**7, 5000, 10, 0, 0, 0],  # memory over allocation
            [10 * s + 4 * s // 10, 7 * 10**7, 100, 20, 5, 0, 0],
        ],
        dtype=np.int64,
    )
    c = clean(None, rows, 1, 1000)
    assert c.valid.tolist() == [True, False, True, False, True]
    assert c.reasons == {1: REASON_CPU, 3: REASON_MEMORY}
    (u,) = c.hours.values()
    assert u.cpu_ns == 7 * 10**7
    assert u.net_bytes == 25
    # memory: 100 B x 0.2 s (first -> third) + 200 B x 0.2 s (third -> fifth)
    assert u.mem_byte_ns == 100 * (2 * s // 10) + 200 * (2 * s // 10)
    assert c.cpu_percent[2] == np.float32(25.0)


def test_gap_over_one_second_bills_counters_but_not_memory() -> None:
    s = 1_000_000_000
    rows = np.array(
        [[0, 0, 512, 0, 0, 0, 0], [s, 10, 512, 1, 1, 0, 0], [s + s + 1, 20, 512, 2, 2, 0, 0]],
        dtype=np.int64,
    )
    (u,) = clean(None, rows, 1, 1024).hours.values()
    assert (u.cpu_ns, u.net_bytes, u.mem_byte_ns) == (20, 4, 512 * s)
    assert (u.gaps, u.gap_ns) == (1, s + 1)


def test_memory_products_beyond_2_pow_64_are_exact() -> None:
    big = 2**40  # 1 TiB used for a whole hour at 10 Hz: 2^40 x 3.6e12 > 2^64
    n = 36_001
    t = np.arange(n, dtype=np.int64) * 100_000_000
    rows = np.zeros((n, 7), dtype=np.int64)
    rows[:, 0] = t
    rows[:, 2] = big
    c = clean(None, rows, 1, big)
    total = sum(u.mem_byte_ns for u in c.hours.values())
    assert total == big * int(t[-1])


def test_rounding_is_half_even_once_per_line() -> None:
    half_cent_cpu = HOUR // 10  # 0.1 vCPU-hours x $0.05 = $0.005 exactly
    amounts = []
    for k in (1, 3):
        inv = build_invoice(
            "cust_x",
            "2026-11",
            [UsageTotals("v1", "standard", cpu_ns=k * half_cent_cpu)],
            discount_pct=Decimal(0),
            credit_balance=Decimal(0),
        )
        amounts += [ln.amount for ln in inv.lines if ln.item == "vcpu"]
    assert amounts == [Decimal("0.00"), Decimal("0.02")]  # 0.005 -> 0.00, 0.015 -> 0.02
    assert pricing.to_decimal(Fraction(25, 1000), pricing.CENT) == Decimal("0.02")


def test_discount_and_credits() -> None:
    ten_vcpu_hours = 10 * HOUR
    inv = build_invoice(
        "cust_x",
        "2026-11",
        [UsageTotals("v1", "pro", cpu_ns=ten_vcpu_hours)],
        discount_pct=Decimal("10.00"),
        credit_balance=Decimal("100"),
    )
    assert inv.subtotal == Decimal("0.50")
    assert inv.discount == Decimal("0.05")
    assert inv.credits_applied == Decimal("0.45")
    assert inv.total == Decimal("0.00")
    html = to_html(inv)
    assert "cust_x" in html and "$0.50" in html and "Total" in html


def test_hour_cost_keeps_twelve_decimals() -> None:
    sheet = pricing.price_sheet("v1", "standard")
    # 400 KB of network: $0.0000372529..., which Decimal(10,4) would store as 0
    cost = pricing.hour_cost(sheet, 0, 0, 400_000)
    assert cost == Decimal("0.000037252903")


@settings(max_examples=200, deadline=None)
@given(
    cpu=st.integers(0, 10**14),
    mem=st.integers(0, 2**90),
    net=st.integers(0, 10**13),
)
def test_hour_cost_equals_exact_rational_rounded_half_even(cpu: int, mem: int, net: int) -> None:
    sheet = pricing.price_sheet("v1", "pro")
    exact = (
        Fraction(cpu, HOUR) * Fraction("0.05")
        + Fraction(mem, HOUR * 2**30) * Fraction("0.01")
        + Fraction(net, 2**30) * Fraction("0.10")
    )
    assert Fraction(pricing.hour_cost(sheet, cpu, mem, net)) == round(exact, 12)


def test_clean_many_equals_clean_per_series() -> None:
    from unkey_deploy.billing.usage import clean_many

    rng = random.Random(99)
    prevs, arrs, vcpus, mems, expect = [], [], [], [], []
    for i in range(40):
        s = make_series(
            rng,
            "c",
            f"vm_{i}",
            "i",
            MONTH_EDGE_NS - 3 * 10**9 * i,
            rng.randint(0, 900),
            vcpus=rng.choice([1, 2]),
            gap_every=rng.choice([0, 7, 300]),
            invalid_every=rng.choice([0, 0, 0, 40]),
        )
        arr = samples_to_array(s.samples) if s.samples else np.zeros((0, 7), dtype=np.int64)
        cut = rng.randint(0, len(arr))
        first = clean(None, arr[:cut], s.key.vcpus, s.key.memory_total_bytes)
        prev = first.last if rng.random() < 0.8 else None
        rest = arr[cut:] if prev is not None or cut == 0 else arr
        prevs.append(prev)
        arrs.append(rest)
        vcpus.append(s.key.vcpus)
        mems.append(s.key.memory_total_bytes)
        expect.append(clean(prev, rest, s.key.vcpus, s.key.memory_total_bytes))
    many = clean_many(prevs, arrs, vcpus, mems)
    assert many.fast.sum() > 20 and (~many.fast).sum() > 0  # both paths exercised
    for j, e in enumerate(expect):
        if many.fast[j]:
            got_hours, got_last = many.hours[j], many.last[j]
            rows = many.rows[many.job == j]
            assert np.array_equal(rows, e.rows[e.valid])
            assert np.array_equal(many.deltas[many.job == j], e.deltas[e.valid])
            assert np.array_equal(many.cpu_percent[many.job == j], e.cpu_percent[e.valid])
        else:
            got_hours, got_last = many.slow[j].hours, many.slow[j].last
        assert got_hours == e.hours, j
        if e.last is None:
            assert got_last is None or (prevs[j] is not None and np.array_equal(got_last, prevs[j]))
        else:
            assert got_last is not None and np.array_equal(got_last, e.last), j


def test_invoice_amounts_are_cents_when_the_balance_has_six_places() -> None:
    from decimal import Decimal

    from unkey_deploy.billing.invoice import build_invoice

    inv = build_invoice(
        "cust_x", "2026-11", [], discount_pct=Decimal("0"), credit_balance=Decimal("0.000000")
    )
    assert str(inv.credits_applied) == "0.00" and str(inv.total) == "0.00"


@settings(max_examples=200, deadline=None)
@given(
    mem=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=20),
    dt=st.integers(0, 10**9),
)
def test_raw_memory_byte_ns_limbs_are_the_exact_product(mem: list[int], dt: int) -> None:
    from unkey_deploy.billing.aggregator import _mem_byte_ns

    n = len(mem)
    counted = np.array([i % 3 != 2 for i in range(n)])
    limbs = _mem_byte_ns(np.array(mem, dtype=np.int64), np.full(n, dt, np.int64), counted)
    got = [int(lo) + (int(hi) << 64) for lo, hi in limbs.tolist()]
    assert got == [m * dt if c else 0 for m, c in zip(mem, counted.tolist(), strict=True)]
