"""Cluster DDL generated from the same migration files: Replicated* engines ON CLUSTER, Distributed
tables sharded by customer, MVs on the local tables; every rendered statement parses in ClickHouse
(chDB's parser, via EXPLAIN AST: no cluster exists here to run them on)."""

from __future__ import annotations

from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.clickhouse.schema import load_migrations, migrations_table_ddl, render


def _all_rendered(cluster: str) -> list[str]:
    out = list(migrations_table_ddl(cluster))
    for mig in load_migrations():
        for stmt in mig.statements:
            out.extend(render(stmt, cluster))
    return out


def _find(stmts: list[str], prefix: str) -> str:
    return next(s for s in stmts if s.startswith(prefix))


def test_cluster_ddl_shape() -> None:
    stmts = _all_rendered("prod")
    joined = "\n".join(stmts)
    assert all(" ON CLUSTER 'prod'" in s for s in stmts)
    assert " ENGINE = MergeTree" not in joined and "ENGINE = AggregatingMergeTree" not in joined

    raw_local = _find(stmts, "CREATE TABLE IF NOT EXISTS metrics_raw_local")
    assert (
        "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/metrics_raw_local', "
        "'{replica}')" in raw_local
    )
    assert "replicated_deduplication_window = 10000" in raw_local
    assert "non_replicated" not in raw_local
    assert "TTL toDateTime(timestamp) + INTERVAL 7 DAY" in raw_local

    raw_dist = next(s for s in stmts if s.startswith("CREATE TABLE IF NOT EXISTS metrics_raw "))
    assert raw_dist == (
        "CREATE TABLE IF NOT EXISTS metrics_raw ON CLUSTER 'prod' AS metrics_raw_local\n"
        "ENGINE = Distributed('prod', currentDatabase(), metrics_raw_local, "
        "cityHash64(customer_id))"
    )

    billing = _find(stmts, "CREATE TABLE IF NOT EXISTS billing_hourly_local")
    assert (
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/"
        "billing_hourly_local', '{replica}', version)" in billing
    )
    five = next(s for s in stmts if s.startswith("CREATE TABLE IF NOT EXISTS metrics_5min_local"))
    assert "ENGINE = ReplicatedAggregatingMergeTree(" in five

    mv = next(s for s in stmts if "metrics_hourly_mv" in s)
    assert mv.startswith(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS metrics_hourly_mv ON CLUSTER 'prod' "
        "TO metrics_hourly_local AS"
    )
    assert "FROM metrics_5min_local" in mv

    # global tables: one replica set across the cluster, no Distributed wrapper
    pb = [s for s in stmts if "processed_batches" in s]
    assert len(pb) == 1
    assert "'/clickhouse/tables/all/{database}/processed_batches'" in pb[0]
    alter = next(s for s in stmts if s.startswith("ALTER TABLE"))
    assert alter.startswith("ALTER TABLE metrics_raw_local ON CLUSTER 'prod' ADD INDEX")


def test_every_cluster_statement_parses(store: ChdbStorage) -> None:
    for stmt in _all_rendered("prod"):
        ast = store.query_arrow("EXPLAIN AST " + stmt)
        assert ast.num_rows > 0, stmt
