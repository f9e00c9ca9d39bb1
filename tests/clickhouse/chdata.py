"""Small hand-checkable data for the usage-store tests (imported by the test modules)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from unkey_deploy.clickhouse.api import RAW_SCHEMA

# Raw rows older than the 7-day TTL are dropped at insert, so test data sits 3 hours before the
# current hour (on an hour boundary) rather than on a fixed date.
T0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
T0_NS = int(T0.timestamp()) * 1_000_000_000


def raw_rows(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """An Arrow table in RAW_SCHEMA; each dict overrides the defaults below (``t_ns`` sets the
    timestamp)."""
    defaults: dict[str, Any] = {
        "customer_id": "cust_a",
        "vm_id": "vm_1",
        "instance_id": "inst_1",
        "interval_ns": 100_000_000,
        "cpu_time_ns": 0,
        "cpu_usage_percent": 0.0,
        "memory_used_bytes": 0,
        "memory_total_bytes": 1 << 30,
        "vcpus": 1,
        "network_rx_bytes": 0,
        "network_tx_bytes": 0,
        "disk_read_bytes": 0,
        "disk_write_bytes": 0,
        "mem_byte_ns": 0,
        "gap_ns": 0,
        "batch_id": "",
    }
    cols: dict[str, list[Any]] = {name: [] for name in RAW_SCHEMA.names}
    for r in rows:
        merged = {**defaults, **{k: v for k, v in r.items() if k != "t_ns"}}
        merged["timestamp"] = r["t_ns"]
        for name in RAW_SCHEMA.names:
            cols[name].append(merged[name])
    return pa.table(cols, schema=RAW_SCHEMA)


def batch(
    *,
    start_ns: int,
    n: int,
    cpu: float,
    customer_id: str = "cust_a",
    vm_id: str = "vm_1",
    batch_id: str = "",
    step_ns: int = 100_000_000,
    **extra: Any,
) -> pa.Table:
    """``n`` intervals 100 ms apart starting at ``start_ns`` with constant CPU and ``extra``."""
    return raw_rows(
        [
            {
                "t_ns": start_ns + i * step_ns,
                "cpu_usage_percent": cpu,
                "customer_id": customer_id,
                "vm_id": vm_id,
                "batch_id": batch_id,
                **extra,
            }
            for i in range(n)
        ]
    )
