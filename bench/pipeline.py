"""Billing pipeline throughput: JetStream -> aggregator -> chDB (raw + rollups + billing).

    .venv/bin/python bench/pipeline.py --vms 2000 --minutes 3

1. ``--vms`` VMs x ``--minutes`` minutes of 10 Hz samples (numpy), cut into 600-sample batches
   (codec v1) and published to a real local nats-server (JetStream, file storage) first.
2. Measured: the real consumer loop (``billing.service.run_consumer``: fetch, decode, clean,
   price, insert raw rows with their rollup views, quarantine, billing_hourly and series states,
   ack after commit) draining the stream into a fresh chDB store. ``samples_per_s`` = samples
   / wall time from the first fetch to the last ack.
3. Ceiling, same run: the same number of raw rows, already built as one Arrow table, inserted
   into another fresh chDB store (same schema and views) with ``Storage.insert_raw`` in inserts
   of the same size, measured once BEFORE and once AFTER the pipeline (the machine is shared: a
   load change between the two phases would otherwise decide the ratio); the ceiling is their
   mean, both are printed.

The process's CPU time is measured too: ``cpu_us_per_sample`` (pipeline) vs
``ceiling_cpu_us_per_sample`` is the cost per sample whatever else runs on the machine.
Last line: ``RESULT samples_per_s=... ceiling_samples_per_s=... ratio=... load=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa

from unkey_deploy.billing.aggregator import Aggregator
from unkey_deploy.billing.customers import CustomerInfo, MemoryDirectory
from unkey_deploy.billing.service import LoopStats, run_consumer
from unkey_deploy.bus.jetstream import connect
from unkey_deploy.bus.server import NatsServer
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.config import BusConfig
from unkey_deploy.metering import stream as mstream
from unkey_deploy.metering.codec import Encoder
from unkey_deploy.metering.model import SeriesKey

GIB = 2**30
N_CUSTOMERS = 50


def make_batches(
    vms: int, minutes: int, start_ns: int
) -> tuple[list[tuple[SeriesKey, int, bytes]], int]:
    rng = np.random.default_rng(1)
    enc = Encoder(level=1)
    out = []
    n = 600
    for v in range(vms):
        key = SeriesKey(f"cust_{v % N_CUSTOMERS:04d}", f"vm_{v:06d}", "i1", 2, 2 * GIB)
        t = start_ns + np.cumsum(np.full(n * minutes, 100_000_000, dtype=np.int64))
        cpu = np.cumsum(rng.integers(0, 2 * 100_000_000, n * minutes))
        mem = rng.integers(GIB // 2, GIB, n * minutes)
        rx = np.cumsum(rng.integers(0, 100_000, n * minutes))
        tx = np.cumsum(rng.integers(0, 50_000, n * minutes))
        dr = np.cumsum(rng.integers(0, 10_000, n * minutes))
        dw = np.cumsum(rng.integers(0, 10_000, n * minutes))
        arr = np.stack([t, cpu, mem, rx, tx, dr, dw], axis=1).astype(np.int64)
        for m in range(minutes):
            out.append((key, m, enc.encode_array(key, m, arr[m * n : (m + 1) * n], check=False)))
    # interleave like a fleet: minute by minute
    out.sort(key=lambda x: (x[1], x[0].vm_id))
    return out, vms * minutes * n


def ceiling_table(rows: int) -> pa.Table:
    rng = np.random.default_rng(2)
    per = 600
    vms = max(1, rows // per)
    idx = np.arange(rows)
    vm = np.array([f"vm_{i:06d}" for i in range(vms)])
    vm_idx = (idx // per) % vms
    return pa.table(
        {
            "customer_id": pa.DictionaryArray.from_arrays(
                pa.array((vm_idx % N_CUSTOMERS).astype(np.int32)),
                pa.array([f"cust_{c:04d}" for c in range(N_CUSTOMERS)]),
            ).cast(pa.string()),
            "vm_id": pa.DictionaryArray.from_arrays(
                pa.array(vm_idx.astype(np.int32)), pa.array(vm)
            ).cast(pa.string()),
            "instance_id": pa.array(["i1"] * 1).take(pa.array(np.zeros(rows, dtype=np.int32))),
            "timestamp": pa.array(
                time.time_ns() - 3600 * 10**9 + (idx % per) * 100_000_000,
                pa.timestamp("ns", tz="UTC"),
            ),
            "interval_ns": pa.array(np.full(rows, 100_000_000, dtype=np.uint64)),
            "cpu_time_ns": pa.array(rng.integers(0, 2 * 10**8, rows).astype(np.uint64)),
            "cpu_usage_percent": pa.array(rng.random(rows).astype(np.float32) * 100),
            "memory_used_bytes": pa.array(rng.integers(GIB // 2, GIB, rows).astype(np.uint64)),
            "memory_total_bytes": pa.array(np.full(rows, 2 * GIB, dtype=np.uint64)),
            "vcpus": pa.array(np.full(rows, 2, dtype=np.uint16)),
            "network_rx_bytes": pa.array(rng.integers(0, 10**5, rows).astype(np.uint64)),
            "network_tx_bytes": pa.array(rng.integers(0, 10**5, rows).astype(np.uint64)),
            "disk_read_bytes": pa.array(rng.integers(0, 10**4, rows).astype(np.uint64)),
            "disk_write_bytes": pa.array(rng.integers(0, 10**4, rows).astype(np.uint64)),
            "mem_byte_ns": pa.array(rng.integers(0, 2**40, rows).astype(np.uint64)),
            "gap_ns": pa.array(np.zeros(rows, dtype=np.uint64)),
            "batch_id": pa.DictionaryArray.from_arrays(
                pa.array((idx // per).astype(np.int32)),
                pa.array([f"vm:{i}" for i in range(rows // per + 1)]),
            ).cast(pa.string()),
        }
    )


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def ceiling_run(tbl: pa.Table, path: Path, step: int) -> tuple[float, float]:
    """Wall and CPU seconds to insert ``tbl`` into a fresh store in inserts of ``step`` rows."""
    ceil = ChdbStorage(path)
    try:
        ceil.migrate()
        c0 = time.process_time()
        t0 = time.perf_counter()
        for i in range(0, tbl.num_rows, step):
            ceil.insert_raw(tbl.slice(i, step), f"ceiling-{i}")
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        ceil.close()


async def run(args: argparse.Namespace, work: Path) -> None:
    start_ns = (time.time_ns() // 10**9 - args.minutes * 60 - 120) * 10**9
    t0 = time.perf_counter()
    batches, total = make_batches(args.vms, args.minutes, start_ns)
    print(
        f"generated {len(batches)} batches / {total} samples in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    tbl = ceiling_table(total)
    step = args.max_msgs * 600
    load_before = loadavg()
    ceil_before, ceil_cpu_before = ceiling_run(tbl, work / "ch-ceiling-1", step)
    print(
        f"ceiling before: bare Arrow insert of {total} rows in {ceil_before:.2f} s "
        f"(load {load_before})",
        file=sys.stderr,
    )
    with NatsServer(work / "nats") as nats:
        bus = await connect(nats.url)
        await bus.ensure_stream(mstream.stream_spec(BusConfig()))
        t0 = time.perf_counter()
        for i in range(0, len(batches), 2000):
            chunk = batches[i : i + 2000]
            res = await bus.publish_many(
                [
                    mstream.batch_message(k.customer_id, f"{k.vm_id}:{k.instance_id}:{s}", d, 600)
                    for k, s, d in chunk
                ]
            )
            assert not any(isinstance(r, Exception) for r in res)
        print(f"published in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

        storage = ChdbStorage(work / "ch")
        storage.migrate()
        directory = MemoryDirectory(
            CustomerInfo(f"cust_{c:04d}", "ten", "standard", Decimal(0), Decimal(0))
            for c in range(N_CUSTOMERS)
        )
        agg = Aggregator(storage, directory)
        stop = asyncio.Event()
        stats = LoopStats()
        load_pipeline = loadavg()
        c0 = time.process_time()
        t0 = time.perf_counter()
        task = asyncio.create_task(
            run_consumer(
                bus,
                agg,
                stop,
                stats=stats,
                max_msgs=args.max_msgs,
                min_samples=args.max_msgs * 600,
                linger_s=0.05,
            )
        )
        while stats.samples < total:
            await asyncio.sleep(0.01)
            if task.done():
                task.result()
        elapsed = time.perf_counter() - t0
        cpu_s = time.process_time() - c0
        stop.set()
        await task
        await bus.close()
        raw_rows = int(storage.query("SELECT count() AS n FROM metrics_raw")[0]["n"])
        bill_rows = int(storage.query("SELECT count() AS n FROM billing_hourly FINAL")[0]["n"])
        storage.close()
    rate = total / elapsed
    print(
        f"pipeline: {total} samples in {elapsed:.2f} s ({stats.flushes} flushes); "
        f"raw rows {raw_rows}, billing rows {bill_rows}",
        file=sys.stderr,
    )

    load_after = loadavg()
    ceil_after, ceil_cpu_after = ceiling_run(tbl, work / "ch-ceiling-2", step)
    ceil_s = (ceil_before + ceil_after) / 2
    ceiling = total / ceil_s
    print(
        f"ceiling after: bare Arrow insert of {total} rows in {ceil_after:.2f} s "
        f"(load {load_after}); ceiling = mean of before/after = {ceiling:.0f} rows/s",
        file=sys.stderr,
    )
    cpu_us = cpu_s / total * 1e6
    ceil_cpu_us = (ceil_cpu_before + ceil_cpu_after) / 2 / total * 1e6
    print(
        f"cpu per sample: pipeline {cpu_us:.2f} us (incl. background merges), "
        f"bare insert {ceil_cpu_us:.2f} us",
        file=sys.stderr,
    )
    print(
        f"RESULT samples_per_s={rate:.0f} ceiling_samples_per_s={ceiling:.0f} "
        f"ratio={rate / ceiling:.2f} ceiling_before={total / ceil_before:.0f} "
        f"ceiling_after={total / ceil_after:.0f} cpu_us_per_sample={cpu_us:.2f} "
        f"ceiling_cpu_us_per_sample={ceil_cpu_us:.2f} vms={args.vms} minutes={args.minutes} "
        f"flushes={stats.flushes} load={load_pipeline}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=2000)
    ap.add_argument("--minutes", type=int, default=3)
    ap.add_argument("--max-msgs", type=int, default=500, help="batches per flush (x600 rows)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as d:
        asyncio.run(run(args, Path(d)))


if __name__ == "__main__":
    main()
