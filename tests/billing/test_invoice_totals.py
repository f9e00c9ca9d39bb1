"""An invoice's quantities are the exact sums of the month's billing_hourly rows, however large
the customer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest

from unkey_deploy.billing import pricing
from unkey_deploy.billing.queries import BillingQueries
from unkey_deploy.clickhouse import queries as chq
from unkey_deploy.clickhouse.api import BillingHourlyRow
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.clock import FakeClock
from unkey_deploy.core.errors import InvalidInput

from .harness import directory

HOUR_NS = 3_600_000_000_000


def test_a_month_of_more_than_2_pow_64_cpu_ns_is_billed_exactly(storage: ChdbStorage) -> None:
    # 120 VMs of 64 vCPUs busy all November: 5.5M vCPU-hours, 1.99e19 CPU ns, more than a
    # UInt64 holds. ClickHouse's sum() of a UInt64 column is a UInt64 and wraps: the invoice
    # billed 0.4M vCPU-hours ($20k) instead of 5.5M ($276k).
    cpu = 64 * HOUR_NS
    net = 3 * 2**30
    start = datetime(2026, 11, 1, tzinfo=UTC)
    sheet = pricing.price_sheet("v1", "standard")
    rows = [
        BillingHourlyRow(
            customer_id="cust_a",
            vm_id=f"vm_{v}",
            instance_id="i1",
            hour=start + timedelta(hours=h),
            cpu_time_ns=cpu,
            mem_byte_ns=0,
            net_rx_bytes=net,
            net_tx_bytes=0,
            disk_read_bytes=0,
            disk_write_bytes=0,
            gap_ns=0,
            sample_count=36_000,
            storage_byte_ns=0,
            cost=pricing.hour_cost(sheet, cpu, 0, net),
            pricing_version="v1",
            version=1,
        )
        for v in range(120)
        for h in range(30 * 24)
    ]
    storage.upsert_billing_hourly(rows)
    q = BillingQueries(storage, directory({"cust_a": (Decimal(0), Decimal(0))}), FakeClock())
    inv = q.invoice("cust_a", "2026-11")
    lines = {ln.item: ln for ln in inv.lines}
    vcpu_hours = Fraction(len(rows) * cpu, HOUR_NS)
    assert vcpu_hours == 5_529_600
    assert lines["vcpu"].quantity == Decimal("5529600.000000")
    assert lines["vcpu"].amount == Decimal("276480.00")
    assert lines["network"].amount == Decimal("25920.00")  # 259,200 GB x $0.10
    assert inv.total == Decimal("302400.00")


def test_a_month_at_the_end_of_the_calendar_is_invalid_input_not_a_crash(
    storage: ChdbStorage,
) -> None:
    # 9999-12 passed the YYYY-MM check, then the month's end (year 10000) raised Python's
    # ValueError: GET /v1/bill?month=9999-12 answered 500
    q = BillingQueries(storage, directory({"cust_a": (Decimal(0), Decimal(0))}), FakeClock())
    with pytest.raises(InvalidInput, match="9999-12"):
        q.invoice("cust_a", "9999-12")
    with pytest.raises(InvalidInput, match="9999-12"):
        chq.monthly_bill(storage, customer_id="cust_a", month="9999-12")
    assert q.invoice("cust_a", "9998-12").total == Decimal("0.00")


def test_a_month_before_the_year_1000_is_an_empty_invoice(storage: ChdbStorage) -> None:
    # check_month takes 0001-01.., but the bounds went to ClickHouse as "1-01-01 00:00:00"
    # (strftime does not pad the year): "ClickHouse rejected the statement: Cannot parse
    # DateTime" instead of the month's (empty) invoice
    q = BillingQueries(storage, directory({"cust_a": (Decimal(0), Decimal(0))}), FakeClock())
    for month in ("0001-01", "0999-12"):
        assert q.invoice("cust_a", month).total == Decimal("0.00")
        assert chq.monthly_bill(storage, customer_id="cust_a", month=month).vm_hours == 0
