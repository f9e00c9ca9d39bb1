"""billing_series_state and billing_replay_batches come from migration 005, on a fresh store, on
a store whose state table the aggregator created itself before 005 existed, and on a cluster."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from unkey_deploy.billing.aggregator import Aggregator, Incoming
from unkey_deploy.billing.customers import CustomerInfo, MemoryDirectory
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.clickhouse.schema import load_migrations, render
from unkey_deploy.metering.codec import encode
from unkey_deploy.metering.model import Batch, Sample, SeriesKey

# What the aggregator ran at start before migration 005 (kept here verbatim as the old layout).
LEGACY_STATE_DDL = """
CREATE TABLE IF NOT EXISTS billing_series_state
(
    vm_id String, instance_id String, customer_id String, vcpus UInt32,
    memory_total_bytes UInt64, last_seq Int64, has_last UInt8,
    t Int64, cpu_time_ns Int64, memory_used_bytes Int64, net_rx_bytes Int64,
    net_tx_bytes Int64, disk_read_bytes Int64, disk_write_bytes Int64,
    hour Int64, acc_cpu_ns UInt64, acc_mem_byte_ns Decimal(38, 0),
    acc_net_rx_bytes UInt64, acc_net_tx_bytes UInt64,
    acc_disk_read_bytes UInt64, acc_disk_write_bytes UInt64,
    acc_gap_ns UInt64, acc_gaps UInt64, acc_samples UInt64,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (vm_id, instance_id)
"""
KEY = SeriesKey("cust_s", "vm_s", "i1", 1, 2**30)
T0 = 1_793_491_080 * 10**9


def _batch(seq: int) -> bytes:
    n = [seq * 10 + i for i in range(1, 11)]
    samples = tuple(Sample(T0 + k * 10**8, k * 5 * 10**7, 2**20, k, k, 0, 0) for k in n)
    return encode(Batch(KEY, seq, samples))


def _directory() -> MemoryDirectory:
    return MemoryDirectory([CustomerInfo("cust_s", "ten_s", "standard", Decimal(0), Decimal(0))])


def _columns(s: ChdbStorage, table: str) -> list[str]:
    rows = s.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String} "
        "ORDER BY position",
        {"t": table},
    )
    return [str(r["name"]) for r in rows]


def test_fresh_store_has_the_state_and_replay_tables(tmp_path: Path) -> None:
    s = ChdbStorage(tmp_path / "ch")
    try:
        s.migrate()
        cols = _columns(s, "billing_series_state")
        assert cols[-3:] == ["skipped", "checkpoint", "version"]
        assert _columns(s, "billing_replay_batches") == [
            "customer_id",
            "vm_id",
            "instance_id",
            "seq",
            "data",
            "received_at",
        ]
    finally:
        s.close()


def test_a_data_dir_from_before_the_migration_keeps_its_state(tmp_path: Path) -> None:
    s = ChdbStorage(tmp_path / "ch")
    try:
        # the store as it was: migrations up to 004 recorded, the state table made by the code
        for mig in load_migrations():
            if mig.version >= "005":
                continue
            for stmt in mig.statements:
                s.command(stmt)
        s.command(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version String, name String, "
            "applied_at DateTime64(6, 'UTC') DEFAULT now64(6)) ENGINE = ReplacingMergeTree "
            "ORDER BY version"
        )
        done = [f"('{m.version}', '{m.name}')" for m in load_migrations() if m.version < "005"]
        s.command("INSERT INTO schema_migrations (version, name) VALUES " + ",".join(done))  # noqa: S608
        s.command(LEGACY_STATE_DDL)
        # a series' state written by the old aggregator: batch 0 applied
        s.command(
            "INSERT INTO billing_series_state VALUES ('vm_s','i1','cust_s',1,1073741824,0,1,"  # noqa: S608
            f"{T0 + 10 * 10**8},{10 * 5 * 10**7},1048576,10,10,0,0,"
            f"{(T0 + 10 * 10**8) // 3_600_000_000_000},0,0,0,0,0,0,0,0,0,1)"
        )
        # 005 and every later migration (those are not about this state)
        assert s.migrate() == [m.version for m in load_migrations() if m.version >= "005"]
        assert _columns(s, "billing_series_state")[-3:] == ["skipped", "checkpoint", "version"]
        # the aggregator resumes from the old row: batch 0 again is a duplicate, 1 is applied
        agg = Aggregator(s, _directory())
        out = agg.process([Incoming(0, _batch(0)), Incoming(1, _batch(1))])
        assert sorted(out.ack) == [0, 1] and out.samples == 10
        rows = s.query(
            "SELECT last_seq, skipped, checkpoint FROM billing_series_state FINAL "
            "WHERE vm_id = 'vm_s'"
        )
        assert rows == [{"last_seq": 1, "skipped": [], "checkpoint": ""}]
        (hour,) = s.query("SELECT cpu_time_ns, sample_count FROM billing_hourly FINAL")
        # 10 samples, cpu 0.05 s each 0.1 s, counted against the old row's last sample
        assert (int(hour["cpu_time_ns"]), int(hour["sample_count"])) == (10 * 5 * 10**7, 10)
    finally:
        s.close()


def test_cluster_ddl_shards_the_new_tables_by_customer() -> None:
    (mig,) = [m for m in load_migrations() if m.version == "005"]
    out = [r for stmt in mig.statements for r in render(stmt, "c1")]
    text = "\n".join(out)
    assert "CREATE TABLE IF NOT EXISTS billing_series_state_local ON CLUSTER 'c1'" in text
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/" in text
    assert "ENGINE = Distributed('c1', currentDatabase(), billing_replay_batches_local, " in text
    assert "ALTER TABLE billing_series_state_local ON CLUSTER 'c1' ADD COLUMN IF NOT EXISTS" in text
    # the Distributed table gets the column too, or inserts naming it fail after an upgrade
    assert "ALTER TABLE billing_series_state ON CLUSTER 'c1' ADD COLUMN IF NOT EXISTS" in text


def test_cluster_alters_change_columns_on_both_tables_and_ttls_on_the_storage_only() -> None:
    (mig,) = [m for m in load_migrations() if m.version == "009"]
    out = [r for stmt in mig.statements for r in render(stmt, "c1")]
    adds = [r for r in out if "ADD COLUMN IF NOT EXISTS expires_at" in r]
    assert [r.split(" ON CLUSTER")[0] for r in adds] == [
        "ALTER TABLE billing_series_state_local", "ALTER TABLE billing_series_state",
    ]  # fmt: skip
    ttls = [r for r in out if "MODIFY TTL" in r]
    assert [r.split(" ON CLUSTER")[0] for r in ttls] == ["ALTER TABLE billing_series_state_local"]
