"""Exactly-once tools: insert dedup tokens (raw and rollups), processed batch ids, raw batch
presence, billing_hourly versions read with FINAL."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest
from chdata import T0, T0_NS, batch

from unkey_deploy.clickhouse import queries
from unkey_deploy.clickhouse.api import BillingHourlyRow, Storage
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.errors import ValidationFailed


def _counts(store: ChdbStorage) -> tuple[int, int]:
    """Rows in raw, and samples in every rollup (which must all agree)."""
    raw = store.query("SELECT count() AS n FROM metrics_raw")[0]["n"]
    rollups = {
        int(store.query("SELECT sum(sample_count) AS n FROM " + t)[0]["n"])  # noqa: S608
        for t in ("metrics_5min", "metrics_hourly", "metrics_daily", "capacity_hourly")
    }
    assert len(rollups) == 1, rollups
    return int(raw), rollups.pop()


def test_is_a_storage(store: ChdbStorage) -> None:
    assert isinstance(store, Storage)


def test_dedup_token_drops_retried_insert_in_raw_and_rollups(store: ChdbStorage) -> None:
    a = batch(start_ns=T0_NS, n=600, cpu=10.0, batch_id="vm_1:inst_1:0")
    b = batch(start_ns=T0_NS + 60_000_000_000, n=600, cpu=20.0, batch_id="vm_1:inst_1:1")
    assert store.insert_raw(a, "tok-0") == 600
    store.insert_raw(a, "tok-0")  # a retry after a lost answer
    assert _counts(store) == (600, 600)
    store.insert_raw(b, "tok-1")
    assert _counts(store) == (1200, 1200)
    store.insert_raw(a, "tok-0")  # a late retry, after other inserts
    assert _counts(store) == (1200, 1200)


def test_dedup_token_survives_reopen(tmp_path: Path) -> None:
    a = batch(start_ns=T0_NS, n=10, cpu=10.0)
    s = ChdbStorage(tmp_path / "ch")
    s.migrate()
    s.insert_raw(a, "tok-x")
    s.close()
    s = ChdbStorage(tmp_path / "ch")
    try:
        s.insert_raw(a, "tok-x")
        assert s.query("SELECT count() AS n FROM metrics_raw")[0]["n"] == 10
    finally:
        s.close()


def test_without_token_nothing_is_deduplicated(store: ChdbStorage) -> None:
    # Two idle VM batches in one bucket give byte-identical rollup blocks; content-hash dedup
    # would silently drop the second. Without a token, every insert counts.
    a = batch(start_ns=T0_NS, n=10, cpu=0.0)
    b = batch(start_ns=T0_NS + 1_000_000_000, n=10, cpu=0.0)
    store.insert_raw(a)
    store.insert_raw(b)
    store.insert_raw(a)  # no token: the caller asked for no dedup
    assert _counts(store) == (30, 30)


def test_processed_batches_and_raw_presence(store: ChdbStorage) -> None:
    ids = [f"vm_1:inst_1:{i}" for i in range(3)]
    assert store.processed_batches(ids) == set()
    store.insert_raw(batch(start_ns=T0_NS, n=5, cpu=1.0, batch_id=ids[0]))
    assert store.raw_batches_present(ids) == {ids[0]}
    store.mark_processed(ids[:2])
    store.mark_processed(ids[:1])  # idempotent
    assert store.processed_batches(ids) == set(ids[:2])
    assert store.processed_batches([]) == set()
    assert store.query("SELECT count() AS n FROM processed_batches FINAL")[0]["n"] == 2
    # many ids: chunked lookups
    many = [f"vm_2:inst_1:{i}" for i in range(12_000)]
    store.mark_processed(many)
    assert store.processed_batches([*many, "nope"]) == set(many)


def test_quarantine_keeps_invalid_samples_with_reason(store: ChdbStorage) -> None:
    tbl = pa.table(
        {
            "customer_id": ["cust_a"],
            "vm_id": ["vm_1"],
            "instance_id": ["inst_1"],
            "batch_id": ["vm_1:inst_1:4"],
            "timestamp": pa.array([T0_NS + 123], pa.timestamp("ns", tz="UTC")),
            "reason": ["counter_decreased:cpu_time_ns"],
            "sample_json": ['{"t": 1}'],
        }
    )
    store.insert_quarantine(tbl, "q-1")
    store.insert_quarantine(tbl, "q-1")
    rows = store.query(
        "SELECT reason, batch_id, toUnixTimestamp64Nano(timestamp) AS t FROM metrics_quarantine"
    )
    assert rows == [
        {"reason": "counter_decreased:cpu_time_ns", "batch_id": "vm_1:inst_1:4", "t": T0_NS + 123}
    ]


def test_insert_raw_rejects_wrong_columns_and_values(store: ChdbStorage) -> None:
    good = batch(start_ns=T0_NS, n=2, cpu=1.0)
    with pytest.raises(ValidationFailed) as e:
        store.insert_raw(good.drop(["vcpus"]).append_column("oops", pa.array([1, 2])))
    assert {p.loc for p in e.value.problems} == {"metrics_raw.vcpus", "metrics_raw.oops"}
    neg = good.set_column(
        good.schema.get_field_index("cpu_time_ns"), "cpu_time_ns", pa.array([-1, 2], pa.int64())
    )
    with pytest.raises(ValidationFailed) as e:
        store.insert_raw(neg)
    assert [p.loc for p in e.value.problems] == ["metrics_raw.cpu_time_ns"]
    assert store.query("SELECT count() AS n FROM metrics_raw")[0]["n"] == 0


def _row(version: int, cost: str, cpu: int) -> BillingHourlyRow:
    return BillingHourlyRow(
        customer_id="cust_a",
        vm_id="vm_1",
        instance_id="inst_1",
        hour=T0,
        cpu_time_ns=cpu,
        mem_byte_ns=(1 << 30) * 3_600_000_000_000,  # 1 GiB-hour: beyond UInt64
        net_rx_bytes=1,
        net_tx_bytes=2,
        disk_read_bytes=3,
        disk_write_bytes=4,
        gap_ns=5,
        sample_count=36_000,
        storage_byte_ns=0,
        cost=Decimal(cost),
        pricing_version="v1",
        version=version,
    )


def test_billing_hourly_final_returns_only_newest_version(store: ChdbStorage) -> None:
    store.upsert_billing_hourly([_row(1_000_000_001, "0.120000000001", 10)])
    store.upsert_billing_hourly([_row(1_000_000_002, "0.220000000002", 20)])
    store.upsert_billing_hourly([_row(1_000_000_000, "9.99", 30)])  # an older recomputation
    # without FINAL the unmerged table holds every version (what the seed design summed)
    assert store.query("SELECT count() AS n FROM billing_hourly")[0]["n"] == 3
    month = T0.strftime("%Y-%m")
    (row,) = queries.billing_rows(store, customer_id="cust_a", month=month)
    assert row == _row(1_000_000_002, "0.220000000002", 20)
    bill = queries.monthly_bill(store, customer_id="cust_a", month=month)
    assert bill.cost == Decimal("0.220000000002")
    assert bill.cpu_time_ns == 20 and bill.vm_hours == 1
    assert bill.memory_gb_hours == Decimal(1)


def test_billing_rows_are_validated(store: ChdbStorage) -> None:
    bad = _row(1, "1", 1)
    bad = BillingHourlyRow(**{**_as_dict(bad), "hour": T0 + timedelta(minutes=1), "version": 0})
    with pytest.raises(ValidationFailed) as e:
        store.upsert_billing_hourly([bad])
    assert {p.loc for p in e.value.problems} == {"rows[0].hour", "rows[0].version"}


def _as_dict(r: BillingHourlyRow) -> dict[str, object]:
    return {name: getattr(r, name) for name in r.__slots__}


def test_concurrent_callers_are_serialized_safely(store: ChdbStorage) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def work(k: int) -> None:
        for j in range(5):
            tbl = batch(start_ns=T0_NS + (k * 5 + j) * 10**9, n=10, cpu=1.0)
            store.insert_raw(tbl, f"thread-{k}-{j}")
            store.mark_processed([f"b{k}-{j}"])
            store.processed_batches([f"b{k}-{j}"])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert _counts(store) == (200, 200)
    assert len(store.processed_batches([f"b{k}-{j}" for k in range(4) for j in range(5)])) == 20


def test_one_chdb_path_per_process(store: ChdbStorage, tmp_path: Path) -> None:
    from unkey_deploy.core.errors import Unavailable

    with pytest.raises(Unavailable, match="one process can hold one chDB path"):
        ChdbStorage(tmp_path / "other")


def test_quarantined_samples_are_kept_however_old_their_time(store: ChdbStorage) -> None:
    # The quarantine's TTL counted from the sample's time, so the next merge dropped rows
    # older than 400 days at once: a batch of old usage quarantined (an import for an unknown
    # customer, a retired series) was acked and then lost. It counts from when the row was
    # quarantined now.
    old = [T0_NS - 500 * 86_400 * 10**9, -5 * 10**9]  # 500 days before T0; before 1970
    tbl = pa.table(
        {
            "customer_id": ["cust_zz", "cust_a"],
            "vm_id": ["vm_1", "vm_1"],
            "instance_id": ["inst_1", "inst_1"],
            "batch_id": ["vm_1:inst_1:0", "vm_1:inst_1:1"],
            "timestamp": pa.array(old, pa.timestamp("ns", tz="UTC")),
            "reason": ["unknown_customer", "negative_value"],
            "sample_json": ['{"t": 1}', '{"t": -5000000000}'],
        }
    )
    assert store.insert_quarantine(tbl, "q-old") == 2
    store.command("OPTIMIZE TABLE metrics_quarantine FINAL")  # a merge applies the TTL
    rows = store.query("SELECT reason FROM metrics_quarantine ORDER BY reason")
    assert [r["reason"] for r in rows] == ["negative_value", "unknown_customer"]
