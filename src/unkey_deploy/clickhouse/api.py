"""The usage store's interface: what the billing aggregator, gatewayd and the CLI may call.

One :class:`Storage` Protocol, two backends (``chdb_backend.ChdbStorage``, embedded, the default;
``server_backend.ServerStorage``, a ClickHouse server by URL via clickhouse-connect), built by
``factory.storage_from_settings``. Everything is ClickHouse SQL text plus Arrow tables, so both
backends run the very same statements.

Tables (see ``migrations/*.sql``):

- ``metrics_raw``: one row per *cleaned interval* between consecutive valid samples of a series
  (BILLING.md "Usage of an interval"). Counters are **deltas**, so ``sum()`` is right.
  ``timestamp`` is the closing sample's time ``b.t``. TTL 7 days.
- ``metrics_5min`` -> ``metrics_hourly`` -> ``metrics_daily``: AggregatingMergeTree rollups fed by a
  chain of materialized views from ``metrics_raw`` (read them with ``-Merge`` / ``max`` / ``sum``,
  see ``queries.py``).
- ``metrics_quarantine``: invalid samples with their reason (never billed).
- ``billing_hourly``: ReplacingMergeTree(version); **always read with FINAL** (queries.py does).
- ``processed_batches``: batch ids whose effects are committed (exactly-once by batch id).

Exactly-once protocol for the aggregator (OpenMeter's order: commit, then record, then ack):

1. ``done = storage.processed_batches(ids)``: ack and skip those.
2. ``present = storage.raw_batches_present(ids)``: raw rows of these batches are already stored
   (a crash hit after step 3 last time); do not insert their rows again.
3. ``storage.insert_raw(tbl, token)`` with ``batch_id`` filled per row and ``token`` derived from
   the sorted batch ids of the insert (a retry of the same insert is dropped by the engine).
4. ``storage.upsert_billing_hourly(rows)`` with a larger ``version`` than any earlier row of the
   same key (e.g. the injected clock's ``time_ns()``).
5. ``storage.mark_processed(ids)``, then ack the messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

# Arrow schema of the rows ``insert_raw`` takes. Columns are matched BY NAME; ``batch_id`` is
# optional (defaults to '') but the aggregator should fill it (step 2 of the protocol above).
RAW_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("vm_id", pa.string()),
        ("instance_id", pa.string()),
        # closing sample time b.t of the interval, UTC; ms precision in ClickHouse
        ("timestamp", pa.timestamp("ns", tz="UTC")),
        ("interval_ns", pa.uint64()),  # b.t - a.t (0 for the first sample of a series)
        ("cpu_time_ns", pa.uint64()),  # delta
        ("cpu_usage_percent", pa.float32()),
        ("memory_used_bytes", pa.uint64()),  # gauge at b
        ("memory_total_bytes", pa.uint64()),
        ("vcpus", pa.uint16()),
        ("network_rx_bytes", pa.uint64()),  # delta
        ("network_tx_bytes", pa.uint64()),  # delta
        ("disk_read_bytes", pa.uint64()),  # delta
        ("disk_write_bytes", pa.uint64()),  # delta
        # a.memory_used_bytes * dt when dt <= 1 s, else 0 (passes 2^64: Decimal(38, 0))
        ("mem_byte_ns", pa.decimal128(38, 0)),
        ("gap_ns", pa.uint64()),  # dt when dt > 1 s, else 0
        ("batch_id", pa.string()),  # "<vm_id>:<instance_id>:<seq>" (metering.model.Batch)
    ]
)
RAW_REQUIRED = tuple(n for n in RAW_SCHEMA.names if n != "batch_id")

# Arrow schema of ``insert_quarantine`` rows: the invalid sample as received, plus why.
QUARANTINE_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("vm_id", pa.string()),
        ("instance_id", pa.string()),
        ("batch_id", pa.string()),
        ("timestamp", pa.timestamp("ns", tz="UTC")),  # sample t
        ("reason", pa.string()),  # e.g. "counter_decreased:cpu_time_ns", "cpu_over_100"
        ("sample_json", pa.string()),  # the sample as JSON, so nothing is lost
    ]
)
QUARANTINE_REQUIRED = ("customer_id", "vm_id", "instance_id", "timestamp", "reason")


@dataclass(frozen=True, slots=True)
class BillingHourlyRow:
    """One VM instance's usage and cost in one UTC hour (BILLING.md "Per VM-hour").

    Quantities are integer base units; ``cost`` is the unrounded Decimal (stored as
    Decimal(38,12)). ``version`` must grow with every recomputation of the same
    (customer_id, hour, vm_id, instance_id): ReplacingMergeTree keeps the largest, FINAL reads it.
    """

    customer_id: str
    vm_id: str
    instance_id: str
    hour: datetime  # timezone-aware, on the hour, UTC
    cpu_time_ns: int
    mem_byte_ns: int
    net_rx_bytes: int
    net_tx_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    gap_ns: int
    sample_count: int
    storage_byte_ns: int
    cost: Decimal
    pricing_version: str
    version: int  # UInt64, e.g. time_ns() of the recomputation

    @property
    def net_bytes(self) -> int:
        return self.net_rx_bytes + self.net_tx_bytes


@runtime_checkable
class Storage(Protocol):
    """The usage store. Thread-safe; every method raises ``core.errors.Unavailable`` when the
    store cannot be reached (retryable) and ``InvalidInput`` for malformed input."""

    def migrate(self) -> list[str]:
        """Apply pending ``migrations/NNN_*.sql`` in order; return the versions applied now.
        Idempotent (records versions in ``schema_migrations``)."""
        ...

    def insert_raw(self, table: pa.Table, dedup_token: str | None = None, /) -> int:
        """Insert cleaned interval rows (``RAW_SCHEMA``, matched by column name, ``batch_id``
        optional). With ``dedup_token``, a second insert with the same token is dropped by the
        engine (and by the rollups). Returns the number of rows sent."""
        ...

    def insert_quarantine(self, table: pa.Table, dedup_token: str | None = None, /) -> int:
        """Insert invalid samples with their reason (``QUARANTINE_SCHEMA``)."""
        ...

    def upsert_billing_hourly(self, rows: Sequence[BillingHourlyRow], /) -> int:
        """Insert (replace) VM-hour billing rows; the highest ``version`` per key wins."""
        ...

    def processed_batches(self, batch_ids: Iterable[str], /) -> set[str]:
        """The subset of ``batch_ids`` already marked processed."""
        ...

    def mark_processed(self, batch_ids: Iterable[str], /) -> None:
        """Record batch ids as processed (idempotent). Call only after their rows are stored."""
        ...

    def raw_batches_present(self, batch_ids: Iterable[str], /) -> set[str]:
        """The subset of ``batch_ids`` that already have rows in ``metrics_raw``."""
        ...

    def query(self, sql: str, params: Mapping[str, Any] | None = None, /) -> list[dict[str, Any]]:
        """Run a SELECT; ``params`` bind ``{name:Type}`` placeholders (server-side binding, never
        string formatting). Rows as dicts."""
        ...

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None, /) -> pa.Table:
        """Like :meth:`query`, as an Arrow table."""
        ...

    def command(self, sql: str, /) -> None:
        """Run a statement with no result (DDL, OPTIMIZE). For operators and tests."""
        ...

    def close(self) -> None:
        """Release the store (chDB: the path's lock, so another process may open it)."""
        ...
