"""The Storage logic shared by both backends, written once over four primitives.

A backend implements ``_exec`` (statement, optional settings), ``_select`` (rows as dicts),
``_select_arrow`` and ``_insert_arrow`` (an Arrow table into named columns, optional settings).
Everything else (migrations, exactly-once markers, billing upserts, validation of inputs) is
here, so chDB and the server run the same SQL texts, which the server-backend tests assert.
"""

from __future__ import annotations

import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import pyarrow as pa

from ..core.errors import InvalidInput, Problem, ValidationFailed
from .api import (
    QUARANTINE_REQUIRED,
    QUARANTINE_SCHEMA,
    RAW_REQUIRED,
    RAW_SCHEMA,
    BillingHourlyRow,
)
from .schema import load_migrations, migrations_table_ddl, render

# How many ids go into one IN-list lookup.
ID_CHUNK = 5_000

BILLING_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("hour", pa.timestamp("s", tz="UTC")),
        ("vm_id", pa.string()),
        ("instance_id", pa.string()),
        ("cpu_time_ns", pa.uint64()),
        ("mem_byte_ns", pa.decimal128(38, 0)),
        ("net_rx_bytes", pa.uint64()),
        ("net_tx_bytes", pa.uint64()),
        ("disk_read_bytes", pa.uint64()),
        ("disk_write_bytes", pa.uint64()),
        ("gap_ns", pa.uint64()),
        ("sample_count", pa.uint64()),
        ("storage_byte_ns", pa.decimal128(38, 0)),
        ("cost", pa.decimal128(38, 12)),
        ("pricing_version", pa.string()),
        ("version", pa.uint64()),
    ]
)
PROCESSED_SCHEMA = pa.schema([("batch_id", pa.string())])

SQL_APPLIED_MIGRATIONS = "SELECT DISTINCT version FROM schema_migrations"
SQL_PROCESSED = (
    "SELECT DISTINCT batch_id FROM processed_batches WHERE batch_id IN {ids:Array(String)}"
)
SQL_RAW_PRESENT = "SELECT DISTINCT batch_id FROM metrics_raw WHERE batch_id IN {ids:Array(String)}"


def _conform(table: pa.Table, schema: pa.Schema, required: Sequence[str], what: str) -> pa.Table:
    """Check names (required present, no unknown) and cast to the schema's types, in schema
    order. A value that does not fit its type is an error naming the column."""
    problems: list[Problem] = []
    names = set(table.column_names)
    for name in required:
        if name not in names:
            problems.append(Problem(loc=f"{what}.{name}", msg="missing column"))
    for name in table.column_names:
        if name not in schema.names:
            problems.append(Problem(loc=f"{what}.{name}", msg="unknown column"))
    if problems:
        raise ValidationFailed(f"{what}: the Arrow table does not match the schema", problems)
    cols: list[pa.ChunkedArray] = []
    fields: list[pa.Field] = []
    for field in schema:
        if field.name not in names:
            continue
        col = table.column(field.name)
        if col.null_count:
            problems.append(Problem(loc=f"{what}.{field.name}", msg="null values"))
            continue
        try:
            cols.append(col.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            problems.append(Problem(loc=f"{what}.{field.name}", msg=str(exc)))
            continue
        fields.append(field)
    if problems:
        raise ValidationFailed(f"{what}: invalid values", problems)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def billing_table(rows: Sequence[BillingHourlyRow]) -> pa.Table:
    """``BillingHourlyRow``s as an Arrow table (exact: Decimal columns, integer units)."""
    problems: list[Problem] = []
    for i, r in enumerate(rows):
        if r.hour.tzinfo is None or r.hour.utcoffset() is None:
            problems.append(Problem(loc=f"rows[{i}].hour", msg="must be timezone-aware (UTC)"))
        elif r.hour.minute or r.hour.second or r.hour.microsecond:
            problems.append(Problem(loc=f"rows[{i}].hour", msg="must be on the hour"))
        if not isinstance(r.cost, Decimal):
            problems.append(Problem(loc=f"rows[{i}].cost", msg="must be a Decimal"))
        if r.version <= 0:
            problems.append(Problem(loc=f"rows[{i}].version", msg="must be > 0"))
    if problems:
        raise ValidationFailed("billing_hourly rows are invalid", problems)
    cols: dict[str, list[Any]] = {name: [] for name in BILLING_SCHEMA.names}
    for r in rows:
        for name in BILLING_SCHEMA.names:
            value = getattr(r, name)
            if name in ("mem_byte_ns", "storage_byte_ns"):
                value = Decimal(value)
            cols[name].append(value)
    try:
        return pa.table(cols, schema=BILLING_SCHEMA)
    except (pa.ArrowInvalid, OverflowError) as exc:
        raise InvalidInput(f"billing_hourly rows do not fit their column types: {exc}") from exc


def _chunks(ids: Iterable[str]) -> Iterable[list[str]]:
    unique = sorted({str(i) for i in ids})
    for start in range(0, len(unique), ID_CHUNK):
        yield unique[start : start + ID_CHUNK]


class SqlStorage(ABC):
    """Implements :class:`~unkey_deploy.clickhouse.api.Storage` over a backend's primitives."""

    def __init__(self, cluster: str | None = None) -> None:
        self.cluster = cluster
        # One statement at a time per storage object: chDB's connection is not thread-safe, and a
        # single ordered stream keeps "insert, then mark processed" ordered for a caller.
        self._lock = threading.RLock()

    # -- primitives -------------------------------------------------------------------------
    @abstractmethod
    def _exec(self, sql: str, settings: Mapping[str, Any] | None = None) -> None: ...

    @abstractmethod
    def _select(self, sql: str, params: Mapping[str, Any] | None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def _select_arrow(self, sql: str, params: Mapping[str, Any] | None) -> pa.Table: ...

    @abstractmethod
    def _insert_arrow(
        self, table_name: str, tbl: pa.Table, settings: Mapping[str, Any] | None
    ) -> None: ...

    def close(self) -> None:
        return None

    # -- Storage ------------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        applied_now: list[str] = []
        with self._lock:
            for stmt in migrations_table_ddl(self.cluster):
                self._exec(stmt)
            done = {str(r["version"]) for r in self._select(SQL_APPLIED_MIGRATIONS, None)}
            for mig in load_migrations():
                if mig.version in done:
                    continue
                for stmt in mig.statements:
                    for rendered in render(stmt, self.cluster):
                        self._exec(rendered)
                # Statements are IF NOT EXISTS: a crash before this record re-runs them safely.
                self._insert_arrow(
                    "schema_migrations",
                    pa.table({"version": [mig.version], "name": [mig.name]}),
                    None,
                )
                applied_now.append(mig.version)
        return applied_now

    def _dedup_settings(self, token: str | None) -> dict[str, Any]:
        if token is None:
            # No token: never deduplicate. Without a token ClickHouse would drop blocks by content
            # hash, and two different inserts can yield identical rollup blocks (idle VMs).
            token = "auto:" + uuid.uuid4().hex
        elif not token or len(token) > 1024:
            raise InvalidInput("dedup_token must be 1..1024 characters")
        settings: dict[str, Any] = {
            "insert_deduplicate": 1,
            "insert_deduplication_token": token,
            # A retry dropped in metrics_raw must not reach the rollups either: the views' blocks
            # get ids derived from the token (the rollups have a dedup window for this).
            "deduplicate_blocks_in_dependent_materialized_views": 1,
            # Our inserts are big blocks already (10k+ rows): no server-side buffering, and the
            # answer means "stored" (see README.md for the measurement).
            "async_insert": 0,
        }
        if self.cluster is not None:
            # Through a Distributed table: insert synchronously into the shard, so the token and
            # the "committed" answer refer to the real table, not a local spool.
            settings["distributed_foreground_insert"] = 1
        return settings

    def insert_raw(self, table: pa.Table, dedup_token: str | None = None, /) -> int:
        tbl = _conform(table, RAW_SCHEMA, RAW_REQUIRED, "metrics_raw")
        if tbl.num_rows == 0:
            return 0
        with self._lock:
            self._insert_arrow("metrics_raw", tbl, self._dedup_settings(dedup_token))
        return int(tbl.num_rows)

    def insert_quarantine(self, table: pa.Table, dedup_token: str | None = None, /) -> int:
        tbl = _conform(table, QUARANTINE_SCHEMA, QUARANTINE_REQUIRED, "metrics_quarantine")
        if tbl.num_rows == 0:
            return 0
        with self._lock:
            self._insert_arrow("metrics_quarantine", tbl, self._dedup_settings(dedup_token))
        return int(tbl.num_rows)

    def upsert_billing_hourly(self, rows: Sequence[BillingHourlyRow], /) -> int:
        if not rows:
            return 0
        tbl = billing_table(rows)
        with self._lock:
            self._insert_arrow("billing_hourly", tbl, self._dedup_settings(None))
        return len(rows)

    def processed_batches(self, batch_ids: Iterable[str], /) -> set[str]:
        return self._ids_in(SQL_PROCESSED, batch_ids)

    def raw_batches_present(self, batch_ids: Iterable[str], /) -> set[str]:
        return self._ids_in(SQL_RAW_PRESENT, batch_ids)

    def _ids_in(self, sql: str, batch_ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        with self._lock:
            for chunk in _chunks(batch_ids):
                found.update(str(r["batch_id"]) for r in self._select(sql, {"ids": chunk}))
        return found

    def mark_processed(self, batch_ids: Iterable[str], /) -> None:
        ids = sorted({str(i) for i in batch_ids})
        if not ids:
            return
        tbl = pa.table({"batch_id": pa.array(ids, pa.string())}, schema=PROCESSED_SCHEMA)
        with self._lock:
            self._insert_arrow("processed_batches", tbl, self._dedup_settings(None))

    def query(self, sql: str, params: Mapping[str, Any] | None = None, /) -> list[dict[str, Any]]:
        with self._lock:
            return self._select(sql, params)

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None, /) -> pa.Table:
        with self._lock:
            return self._select_arrow(sql, params)

    def command(self, sql: str, /) -> None:
        with self._lock:
            self._exec(sql)
