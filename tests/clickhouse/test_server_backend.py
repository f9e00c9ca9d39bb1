"""The server backend, tested for every statement it sends: a recording double of the
clickhouse-connect client (command / query / query_arrow / insert_arrow, same signatures)
captures SQL text, parameters, settings and Arrow tables; the same texts then run through chDB,
which proves they are valid ClickHouse (no ClickHouse server can be installed here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from chdata import T0, T0_NS, batch, raw_rows
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from unkey_deploy.clickhouse import queries
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.clickhouse.factory import storage_from_settings
from unkey_deploy.clickhouse.schema import (
    MIGRATIONS_TABLE_DDL,
    load_migrations,
    migrations_table_ddl,
    render,
)
from unkey_deploy.clickhouse.server_backend import ServerStorage
from unkey_deploy.clickhouse.sqlstorage import SQL_PROCESSED, SQL_RAW_PRESENT
from unkey_deploy.core import config
from unkey_deploy.core.errors import InvalidInput, Unavailable
from unkey_deploy.core.net import free_port


@dataclass
class Call:
    method: str
    sql: str  # SQL text, or the table name for insert_arrow
    parameters: Any = None
    settings: dict[str, Any] | None = None
    table: pa.Table | None = None


class _Result:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self._rows = rows

    def named_results(self) -> list[dict[str, Any]]:
        return self._rows


@dataclass
class RecordingClient:
    """Follows clickhouse_connect.driver.client.Client's signatures for the methods used."""

    answers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    fail_with: Exception | None = None
    closed: bool = False

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def command(
        self,
        cmd: str,
        parameters: Any = None,
        data: Any = None,
        settings: dict[str, Any] | None = None,
    ) -> Any:
        self._maybe_fail()
        self.calls.append(Call("command", cmd, parameters, settings))
        return 0

    def query(
        self, query: str, parameters: Any = None, settings: dict[str, Any] | None = None
    ) -> Any:
        self._maybe_fail()
        self.calls.append(Call("query", query, parameters, settings))
        return _Result(self.answers.get(query, []))

    def query_arrow(
        self, query: str, parameters: Any = None, settings: dict[str, Any] | None = None
    ) -> Any:
        self._maybe_fail()
        self.calls.append(Call("query_arrow", query, parameters, settings))
        return pa.table({"x": pa.array([], pa.uint8())})

    def insert_arrow(
        self,
        table: str,
        arrow_table: Any,
        database: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Any:
        self._maybe_fail()
        self.calls.append(Call("insert_arrow", table, None, settings, arrow_table))
        return None

    def close(self) -> None:
        self.closed = True


def _replay(calls: list[Call], store: ChdbStorage) -> None:
    """Run recorded calls through chDB with the same SQL, parameters, settings and tables."""
    for c in calls:
        if c.method == "command":
            store._exec(c.sql, c.settings)
        elif c.method in ("query", "query_arrow"):
            store.query(c.sql, c.parameters)
        else:
            assert c.table is not None
            store._insert_arrow(c.sql, c.table, c.settings)


def test_migrate_sends_the_migration_files_and_records_versions(tmp_path: Path) -> None:
    rec = RecordingClient()
    server = ServerStorage(client=rec)
    versions = [m.version for m in load_migrations()]
    assert server.migrate() == versions
    expected = [MIGRATIONS_TABLE_DDL]
    for m in load_migrations():
        expected.extend(m.statements)
    assert [c.sql for c in rec.calls if c.method == "command"] == expected
    (applied_q,) = [c for c in rec.calls if c.method == "query"]
    assert applied_q.sql == "SELECT DISTINCT version FROM schema_migrations"
    inserts = [c for c in rec.calls if c.method == "insert_arrow"]
    assert [c.sql for c in inserts] == ["schema_migrations"] * len(versions)
    assert [c.table.column("version")[0].as_py() for c in inserts if c.table] == versions
    # the very same calls build a working schema in chDB
    chdb_store = ChdbStorage(tmp_path / "ch")
    try:
        _replay(rec.calls, chdb_store)
        assert chdb_store.migrate() == []  # versions recorded by the replayed inserts
        assert chdb_store.query("SELECT count() AS n FROM metrics_raw") == [{"n": 0}]
    finally:
        chdb_store.close()
    # already applied: the server is asked, nothing is re-run
    rec2 = RecordingClient(answers={applied_q.sql: [{"version": v} for v in versions]})
    assert ServerStorage(client=rec2).migrate() == []
    assert [c.method for c in rec2.calls] == ["command", "query"]


def test_cluster_migrate_sends_on_cluster_ddl(store: ChdbStorage) -> None:
    rec = RecordingClient()
    ServerStorage(client=rec, cluster="prod").migrate()
    commands = [c.sql for c in rec.calls if c.method == "command"]
    expected = list(migrations_table_ddl("prod"))
    for m in load_migrations():
        for stmt in m.statements:
            expected.extend(render(stmt, "prod"))
    assert commands == expected
    assert all("ON CLUSTER 'prod'" in c for c in commands)
    for c in commands:
        assert store.query_arrow("EXPLAIN AST " + c).num_rows > 0


def test_inserts_carry_dedup_token_and_settings(store: ChdbStorage) -> None:
    rec = RecordingClient()
    server = ServerStorage(client=rec)
    tbl = batch(start_ns=T0_NS, n=600, cpu=5.0, batch_id="vm_1:inst_1:0")
    assert server.insert_raw(tbl, "batch-token-1") == 600
    (call,) = rec.calls
    assert call.method == "insert_arrow" and call.sql == "metrics_raw"
    assert call.settings == {
        "insert_deduplicate": 1,
        "insert_deduplication_token": "batch-token-1",
        "deduplicate_blocks_in_dependent_materialized_views": 1,
        "async_insert": 0,
    }
    assert call.table is not None and call.table.column_names == tbl.column_names
    # replayed twice in chDB: the token drops the second one
    _replay([call, call], store)
    assert store.query("SELECT count() AS n FROM metrics_raw") == [{"n": 600}]

    # without a token: a fresh random one per insert (no content-hash dedup)
    server.insert_raw(tbl)
    server.insert_raw(tbl)
    t1, t2 = (c.settings["insert_deduplication_token"] for c in rec.calls[1:] if c.settings)
    assert t1 != t2 and t1.startswith("auto:")

    # on a cluster, inserts into the Distributed table are synchronous
    rec_c = RecordingClient()
    ServerStorage(client=rec_c, cluster="prod").insert_raw(tbl, "t")
    assert rec_c.calls[0].settings is not None
    assert rec_c.calls[0].settings["distributed_foreground_insert"] == 1


def test_batch_markers_and_billing_statements(store: ChdbStorage) -> None:
    rec = RecordingClient(answers={SQL_PROCESSED: [{"batch_id": "b1"}]})
    server = ServerStorage(client=rec)
    assert server.processed_batches(["b2", "b1", "b1"]) == {"b1"}
    assert server.raw_batches_present(["b3"]) == set()
    server.mark_processed(["b2", "b1"])
    q1, q2, ins = rec.calls
    assert (q1.method, q1.sql, q1.parameters) == ("query", SQL_PROCESSED, {"ids": ["b1", "b2"]})
    assert (q2.sql, q2.parameters) == (SQL_RAW_PRESENT, {"ids": ["b3"]})
    assert ins.sql == "processed_batches" and ins.table is not None
    assert ins.table.to_pylist() == [{"batch_id": "b1"}, {"batch_id": "b2"}]
    _replay([ins], store)
    assert store.processed_batches(["b1", "b2", "b3"]) == {"b1", "b2"}
    for c in (q1, q2):
        store.query(c.sql, c.parameters)  # valid SQL with these parameters


def test_query_functions_send_valid_parameterised_sql(store: ChdbStorage) -> None:
    rec = RecordingClient()
    server = ServerStorage(client=rec)
    queries.dashboard(server, customer_id="cust_a", now=T0, minutes=5)
    with pytest.raises(IndexError):
        queries.monthly_bill(server, customer_id="cust_a", month="2026-11")  # no answer rows
    queries.capacity_planning(server, customer_id="cust_a", start=T0, end=T0 + timedelta(hours=1))
    for res in ("5min", "hour", "day"):
        queries.vm_usage(server, customer_id="cust_a", start=T0, end=T0, resolution=res)  # type: ignore[arg-type]
    queries.vm_usage(server, customer_id="cust_a", vm_id="vm_1", start=T0, end=T0)
    queries.billing_rows(server, customer_id="cust_a", month="2026-11")
    queries.hour_usage(server, customer_id="cust_a", vm_id="vm_1", start=T0, end=T0)
    assert len(rec.calls) == 9
    for c in rec.calls:
        assert c.method == "query"
        # every tenant read is scoped by a bound parameter, never by text
        assert c.parameters["customer_id"] == "cust_a"
        assert "customer_id = {customer_id:String}" in c.sql
        assert "cust_a" not in c.sql and "vm_1" not in c.sql
        # the time window is bound too, with the placeholder type the column is compared as
        assert set(c.parameters) >= {"start", "end"}
        assert re.search(r"\{start:DateTime(64\(\d, 'UTC'\)|\('UTC'\))\}", c.sql), c.sql
        if "billing_hourly" in c.sql:
            # FINAL, and the scope in PREWHERE (exact: its columns are in the sorting key)
            assert "FROM billing_hourly FINAL\nPREWHERE customer_id = " in c.sql
        store.query(c.sql, c.parameters)  # chDB accepts the same text and parameters
    dash = rec.calls[0]
    assert dash.parameters == {
        "customer_id": "cust_a",
        "start": (T0 - timedelta(minutes=5)).strftime("%Y-%m-%d %H:%M:%S.%f"),
        "end": T0.strftime("%Y-%m-%d %H:%M:%S.%f"),
    }
    assert "timestamp > {start:DateTime64(6, 'UTC')}" in dash.sql
    assert "timestamp <= {end:DateTime64(6, 'UTC')}" in dash.sql
    one_vm = rec.calls[6]
    assert (one_vm.parameters["any_vm"], one_vm.parameters["vm_id"]) == (0, "vm_1")


def test_platform_capacity_has_no_customer_condition(store: ChdbStorage) -> None:
    """The operator-only platform read binds no customer and filters on none, so ClickHouse can
    answer it from capacity_hourly's per-hour projection (migration 008)."""
    s = 1_000_000_000
    store.insert_raw(
        raw_rows(
            [
                {"t_ns": T0_NS + s, "cpu_usage_percent": 10.0},
                {"t_ns": T0_NS + s, "customer_id": "cust_b", "vm_id": "vm_2"},
            ]
        )
    )
    rec = RecordingClient()
    queries.capacity_planning(
        ServerStorage(client=rec), customer_id=None, start=T0, end=T0 + timedelta(hours=1)
    )
    (c,) = rec.calls
    assert c.sql == queries.SQL_CAPACITY
    assert c.parameters == {
        "start": T0.strftime("%Y-%m-%d %H:%M:%S"),
        "end": (T0 + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S"),
    }
    assert "customer_id" not in c.sql
    plan = "\n".join(
        str(r["explain"]) for r in store.query("EXPLAIN indexes=1 " + c.sql, c.parameters)
    )
    assert "ReadFromMergeTree (p_platform)" in plan
    customer = "\n".join(
        str(r["explain"])
        for r in store.query(
            "EXPLAIN indexes=1 " + queries.SQL_CAPACITY_CUSTOMER,
            {**c.parameters, "customer_id": "cust_a"},
        )
    )
    assert "p_platform" not in customer
    # the projection's answer is the rows' answer: both customers' VMs and samples
    (hour,) = queries.capacity_planning(
        store, customer_id=None, start=T0, end=T0 + timedelta(hours=1)
    )
    assert (hour.hour, hour.active_vms, hour.samples, hour.max_cpu) == (T0, 2, 2, 10.0)


def test_errors_map_to_the_error_tree() -> None:
    server = ServerStorage(client=RecordingClient(fail_with=OperationalError("conn refused")))
    with pytest.raises(Unavailable) as e:
        server.query("SELECT 1")
    assert e.value.retryable
    server = ServerStorage(client=RecordingClient(fail_with=DatabaseError("Code: 62. Syntax")))
    with pytest.raises(InvalidInput, match="Syntax"):
        server.command("SELEC 1")


def test_factory_defaults_to_chdb_under_data_dir(tmp_path: Path) -> None:
    settings = config.load(data_dir=tmp_path / "data")
    s = storage_from_settings(settings)
    try:
        assert isinstance(s, ChdbStorage)
        assert s.path == tmp_path / "data" / "clickhouse"
        assert s.migrate()
    finally:
        s.close()


def test_factory_uses_the_server_url(tmp_path: Path) -> None:
    url = f"http://default:pw@127.0.0.1:{free_port()}/usage"
    settings = config.load(data_dir=tmp_path, billing={"clickhouse_url": url, "cluster": "c1"})
    with pytest.raises(Unavailable, match=r"127\.0\.0\.1"):
        storage_from_settings(settings)  # nothing listens there: a clear retryable error
    bad = config.load(data_dir=tmp_path, billing={"clickhouse_url": "ftp://x"})
    with pytest.raises(InvalidInput, match="clickhouse_url"):
        storage_from_settings(bad)


def test_billing_and_quarantine_inserts(store: ChdbStorage) -> None:
    from decimal import Decimal

    from unkey_deploy.clickhouse.api import BillingHourlyRow

    row = BillingHourlyRow(
        customer_id="cust_a",
        vm_id="vm_1",
        instance_id="inst_1",
        hour=T0,
        cpu_time_ns=1,
        mem_byte_ns=2**70,
        net_rx_bytes=2,
        net_tx_bytes=3,
        disk_read_bytes=4,
        disk_write_bytes=5,
        gap_ns=6,
        sample_count=7,
        storage_byte_ns=8,
        cost=Decimal("0.000000000007"),
        pricing_version="v1",
        version=9,
    )
    q = pa.table(
        {
            "customer_id": ["cust_a"],
            "vm_id": ["vm_1"],
            "instance_id": ["inst_1"],
            "timestamp": pa.array([T0_NS], pa.timestamp("ns", tz="UTC")),
            "reason": ["cpu_over_100"],
        }
    )
    rec = RecordingClient()
    server = ServerStorage(client=rec)
    server.upsert_billing_hourly([row])
    server.insert_quarantine(q, "q-tok")
    bill, quar = rec.calls
    assert (bill.method, bill.sql) == ("insert_arrow", "billing_hourly")
    assert bill.settings is not None and bill.settings["async_insert"] == 0
    assert (quar.sql, quar.settings and quar.settings["insert_deduplication_token"]) == (
        "metrics_quarantine",
        "q-tok",
    )
    _replay([bill, quar], store)
    assert queries.billing_rows(store, customer_id="cust_a", month=T0.strftime("%Y-%m")) == [row]
    assert store.query("SELECT reason FROM metrics_quarantine") == [{"reason": "cpu_over_100"}]
