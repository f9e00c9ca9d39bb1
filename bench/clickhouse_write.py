"""Write path into the usage store (chDB, full schema with the rollup MV chain attached):
plain big Arrow inserts vs async_insert vs a Buffer table, each with exactly-once checked.

    .venv/bin/python bench/clickhouse_write.py [--batches 400] [--batch-rows 600]

The aggregator receives 600-row VM batches (60 s at 10 Hz). Variants, each on a fresh database:
  plain_600       one Arrow INSERT per batch, dedup token = batch id
  plain_10k       batches coalesced into ~10k-row Arrow INSERTs, token = the inserted batch ids
  plain_100k      same, ~100k rows per INSERT
  async_600       one INSERT per batch with async_insert=1, wait_for_async_insert=1 (needed to
                  ack only after commit), async_insert_deduplicate=1, token = batch id; sent as
                  Arrow bytes (async_insert applies to INSERT ... FORMAT with data, not INSERT
                  SELECT)
  buffer_600      one INSERT per batch into a Buffer table in front of metrics_raw
Exactly-once check per variant: the first insert is retried with the same token; the final
row count must equal the distinct rows sent.
Last line: ``RESULT plain_10k_rows_per_s=... baseline_plain_600_rows_per_s=... ratio=...``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from unkey_deploy.clickhouse.chdb_backend import ChdbStorage, settings_clause  # noqa: E402
from unkey_deploy.clickhouse.synth import Fleet, raw_chunk  # noqa: E402

S = 1_000_000_000


def make_batches(n: int, rows: int) -> list[pa.Table]:
    fleet = Fleet(vms=n, customers=20)
    start = (int(time.time()) - 3600) * S
    big = raw_chunk(fleet, start, rows, S // 10)  # VM-major: each VM's `rows` are contiguous
    return [big.slice(i * rows, rows) for i in range(n)]


def count(store: ChdbStorage) -> tuple[int, int]:
    raw = int(store.query("SELECT count() AS n FROM metrics_raw")[0]["n"])
    five = int(store.query("SELECT sum(sample_count) AS n FROM metrics_5min")[0]["n"] or 0)
    return raw, five


def variant(
    name: str,
    batches: list[pa.Table],
    send: Callable[[ChdbStorage, list[pa.Table], str], None],
    group: int,
    *,
    setup: Callable[[ChdbStorage], None] | None = None,
    settle: Callable[[ChdbStorage], None] | None = None,
) -> float:
    with tempfile.TemporaryDirectory() as d:
        store = ChdbStorage(Path(d) / "ch")
        try:
            store.migrate()
            if setup:
                setup(store)
            groups = [batches[i : i + group] for i in range(0, len(batches), group)]
            t0 = time.perf_counter()
            for gi, g in enumerate(groups):
                send(store, g, f"{name}-{gi}")
            if settle:
                settle(store)
            secs = time.perf_counter() - t0
            sent = sum(b.num_rows for b in batches)
            send(store, groups[0], f"{name}-0")  # the retry of the first insert
            if settle:
                settle(store)
            raw, five = count(store)
            ok = "exactly-once OK" if raw == sent and five == sent else "DUPLICATES"
            print(
                f"{name:<12} {sent / secs:>12,.0f} rows/s  {len(groups):>5} inserts  "
                f"{secs * 1000 / len(groups):7.1f} ms/insert   after retry: raw={raw:,} "
                f"5min={five:,} of {sent:,} -> {ok}",
                flush=True,
            )
            return sent / secs
        finally:
            store.close()


def plain(store: ChdbStorage, group: list[pa.Table], token: str) -> None:
    store.insert_raw(pa.concat_tables(group), token)


def async_send(store: ChdbStorage, group: list[pa.Table], token: str) -> None:
    tbl = pa.concat_tables(group)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, tbl.schema) as w:
        w.write_table(tbl)
    settings = {
        "async_insert": 1,
        "wait_for_async_insert": 1,
        "async_insert_deduplicate": 1,
        "insert_deduplication_token": token,
    }
    cols = ", ".join(tbl.column_names)
    with store._lock:
        ins = store._conn.send_insert(
            f"INSERT INTO metrics_raw ({cols}){settings_clause(settings)}", "Arrow"
        )
        ins.append(sink.getvalue().to_pybytes())
        ins.finish()


def buffer_setup(store: ChdbStorage) -> None:
    store.command(
        "CREATE TABLE metrics_raw_buffer AS metrics_raw ENGINE = Buffer(currentDatabase(), "
        "metrics_raw, 1, 1, 10, 10000, 1000000, 10000000, 100000000)"
    )


def buffer_send(store: ChdbStorage, group: list[pa.Table], token: str) -> None:
    arrow_tbl = pa.concat_tables(group)  # noqa: F841 (read by chDB's Python())
    cols = ", ".join(group[0].column_names)
    settings = {"insert_deduplication_token": token}
    with store._lock:
        store._conn.query(
            f"INSERT INTO metrics_raw_buffer ({cols}){settings_clause(settings)} "  # noqa: S608
            f"SELECT {cols} FROM Python(arrow_tbl)",
            "CSV",
        )


def buffer_flush(store: ChdbStorage) -> None:
    store.command("OPTIMIZE TABLE metrics_raw_buffer")  # flushes the buffer to metrics_raw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--batch-rows", type=int, default=600)
    args = ap.parse_args()
    batches = make_batches(args.batches, args.batch_rows)
    print(f"{args.batches} batches x {args.batch_rows} rows, full schema (raw + 4 MVs)")
    per10k = max(1, 10_000 // args.batch_rows + 1)
    per100k = max(1, 100_000 // args.batch_rows + 1)
    r600 = variant("plain_600", batches, plain, 1)
    r10k = variant("plain_10k", batches, plain, per10k)
    r100k = variant("plain_100k", batches, plain, per100k)
    ra = variant("async_600", batches, async_send, 1)
    rb = variant("buffer_600", batches, buffer_send, 1, setup=buffer_setup, settle=buffer_flush)
    print(
        f"RESULT plain_10k_rows_per_s={r10k:.0f} plain_100k_rows_per_s={r100k:.0f} "
        f"async_600_rows_per_s={ra:.0f} buffer_600_rows_per_s={rb:.0f} "
        f"baseline_plain_600_rows_per_s={r600:.0f} ratio={r10k / r600:.1f}"
    )


if __name__ == "__main__":
    main()
