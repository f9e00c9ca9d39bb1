"""Migrations are versioned and idempotent; the schema carries the TTLs, codecs and settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.clickhouse.schema import load_migrations, render, split_statements
from unkey_deploy.core.errors import InvalidInput


def _create(store: ChdbStorage, table: str) -> str:
    rows = store.query(
        "SELECT create_table_query FROM system.tables "
        "WHERE database = currentDatabase() AND name = {t:String}",
        {"t": table},
    )
    assert rows, f"{table} missing"
    return str(rows[0]["create_table_query"])


def test_migrations_apply_once_and_are_recorded(tmp_path: Path) -> None:
    s = ChdbStorage(tmp_path / "ch")
    try:
        versions = [m.version for m in load_migrations()]
        assert versions == sorted(versions) and versions[0] == "001"
        assert s.migrate() == versions
        assert s.migrate() == []
    finally:
        s.close()
    # a new process-lifetime (re-open of the path) sees the same record and applies nothing
    s = ChdbStorage(tmp_path / "ch")
    try:
        assert s.migrate() == []
        recorded = s.query("SELECT version FROM schema_migrations FINAL ORDER BY version")
        assert [r["version"] for r in recorded] == versions
        tables = {r["name"] for r in s.query("SHOW TABLES")}
        assert {
            "metrics_raw",
            "metrics_5min",
            "metrics_hourly",
            "metrics_daily",
            "metrics_5min_mv",
            "metrics_hourly_mv",
            "metrics_daily_mv",
            "billing_hourly",
            "metrics_quarantine",
            "processed_batches",
            "capacity_hourly",
            "capacity_hourly_mv",
        } <= tables
    finally:
        s.close()


def test_raw_table_ttl_partitioning_codecs_and_dedup_window(store: ChdbStorage) -> None:
    ddl = _create(store, "metrics_raw")
    assert "PARTITION BY toYYYYMMDD(timestamp)" in ddl
    assert "ORDER BY (customer_id, vm_id, timestamp)" in ddl
    assert "TTL toDateTime(timestamp) + toIntervalDay(7)" in ddl
    assert "ttl_only_drop_parts = 1" in ddl
    assert "non_replicated_deduplication_window = 10000" in ddl
    codecs = {
        r["name"]: r["compression_codec"]
        for r in store.query(
            "SELECT name, compression_codec FROM system.columns "
            "WHERE database = currentDatabase() AND table = 'metrics_raw'"
        )
    }
    assert codecs["timestamp"] == "CODEC(DoubleDelta, ZSTD(1))"
    assert codecs["cpu_usage_percent"].startswith("CODEC(Gorilla")
    assert codecs["cpu_time_ns"] == "CODEC(T64, ZSTD(1))"
    assert codecs["memory_used_bytes"].startswith("CODEC(Delta")
    types = {
        r["name"]: r["type"]
        for r in store.query(
            "SELECT name, type FROM system.columns "
            "WHERE database = currentDatabase() AND table = 'metrics_raw'"
        )
    }
    assert types["customer_id"] == "LowCardinality(String)"
    assert types["vm_id"] == "LowCardinality(String)"
    assert types["timestamp"] == "DateTime64(3, 'UTC')"


def test_rollup_and_billing_tables(store: ChdbStorage) -> None:
    five = _create(store, "metrics_5min")
    assert "ENGINE = AggregatingMergeTree" in five
    assert "TTL bucket + toIntervalDay(30)" in five
    # every non-key column is an aggregate state, so merges combine instead of picking a row
    for table in ("metrics_5min", "metrics_hourly", "metrics_daily", "capacity_hourly"):
        cols = store.query(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
            "AND table = {t:String} AND is_in_sorting_key = 0",
            {"t": table},
        )
        assert cols
        for c in cols:
            assert str(c["type"]).startswith(("AggregateFunction", "SimpleAggregateFunction")), c
    billing = _create(store, "billing_hourly")
    assert "ENGINE = ReplacingMergeTree(version)" in billing
    assert "ORDER BY (customer_id, hour, vm_id, instance_id)" in billing
    assert "`cost` Decimal(38, 12)" in billing
    assert "`version` UInt64" in billing


def test_split_statements_drops_comments_and_keeps_order() -> None:
    sql = (
        "-- c\nCREATE TABLE a (x UInt8) ENGINE = MergeTree ORDER BY x;\n\n"
        "-- d\nALTER TABLE a ADD x;\n"
    )
    assert split_statements(sql) == [
        "CREATE TABLE a (x UInt8) ENGINE = MergeTree ORDER BY x",
        "ALTER TABLE a ADD x",
    ]


def test_render_single_node_is_identity() -> None:
    for mig in load_migrations():
        for stmt in mig.statements:
            assert render(stmt, None) == [stmt]


def test_render_rejects_hostile_cluster_name() -> None:
    with pytest.raises(InvalidInput, match="cluster name"):
        render("CREATE TABLE IF NOT EXISTS x (a UInt8) ENGINE = MergeTree ORDER BY a", "c'; DROP")


@pytest.mark.parametrize(
    "value", ["plain", "it's", "back\\slash", "tab\there", "new\nline", "a\\tb", "quote'\\'"]
)
def test_string_parameters_round_trip_exactly(store: ChdbStorage, value: str) -> None:
    (row,) = store.query("SELECT {v:String} AS v", {"v": value})
    assert row["v"] == value
    (row,) = store.query("SELECT {v:Array(String)} AS v", {"v": [value, "x"]})
    assert row["v"] == [value, "x"]
