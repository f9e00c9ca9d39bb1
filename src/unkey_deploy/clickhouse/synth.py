"""Synthetic fleet usage for benchmarks (``bench/queries.py``, ``bench/clickhouse_write.py``).

Vectorised with numpy and built straight into Arrow in ``RAW_SCHEMA``: smooth CPU (per-VM base +
sine + noise), slowly varying page-aligned memory, Poisson-ish counter deltas. Not for tests
(they use small hand-checked data).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import numpy as np
import pyarrow as pa

from .api import RAW_SCHEMA, BillingHourlyRow

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class Fleet:
    vms: int
    customers: int
    seed: int = 7

    def customer_of(self, vm: int) -> str:
        return f"cust_{vm % self.customers:04d}"

    def vm_name(self, vm: int) -> str:
        return f"vm_{vm:05d}"


def _dict_col(names: list[str], idx: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(idx.astype(np.int32)), pa.array(names)).cast(
        pa.string()
    )


def raw_chunk(
    fleet: Fleet, start_ns: int, steps: int, step_ns: int, *, batch_seq: int = 0
) -> pa.Table:
    """``steps`` intervals of ``step_ns`` for every VM, starting after ``start_ns`` (rows are
    VM-major: all of VM 0's intervals, then VM 1's ...)."""
    rng = np.random.default_rng(fleet.seed + start_ns // step_ns)
    n_vm = fleet.vms
    n = n_vm * steps
    vm = np.repeat(np.arange(n_vm), steps)
    k = np.tile(np.arange(1, steps + 1, dtype=np.int64), n_vm)
    t = start_ns + k * step_ns
    vcpus = (1 + vm % 4).astype(np.uint16)
    mem_total = ((1 + vm % 8) * GIB).astype(np.uint64)
    base = 5.0 + (vm % 17) * 4.0
    phase = (t // 1_000_000_000) % 3600 / 3600.0 * 2 * np.pi
    cpu = np.clip(base + 15.0 * np.sin(phase + vm) + rng.normal(0, 2.0, n), 0, 100).astype(
        np.float32
    )
    cpu_time = (cpu.astype(np.float64) / 100.0 * vcpus * step_ns).astype(np.uint64)
    mem_used = mem_total.astype(np.float64) * (0.3 + 0.2 * np.sin(phase / 2 + vm)) // 4096 * 4096
    mem_used = mem_used.astype(np.uint64)
    rx = rng.poisson(2000 * step_ns / 1e8, n).astype(np.uint64)
    tx = rng.poisson(800 * step_ns / 1e8, n).astype(np.uint64)
    dr = rng.poisson(400 * step_ns / 1e8, n).astype(np.uint64)
    dw = rng.poisson(600 * step_ns / 1e8, n).astype(np.uint64)
    interval = np.full(n, step_ns, np.uint64)
    mem_byte_ns = (
        mem_used * np.uint64(step_ns) if step_ns <= 1_000_000_000 else np.zeros(n, np.uint64)
    )
    gap = np.zeros(n, np.uint64) if step_ns <= 1_000_000_000 else interval
    customers = [fleet.customer_of(i) for i in range(fleet.customers)]
    vms = [fleet.vm_name(i) for i in range(n_vm)]
    cols = {
        "customer_id": _dict_col(customers, vm % fleet.customers),
        "vm_id": _dict_col(vms, vm),
        "instance_id": _dict_col(["inst_1"], np.zeros(n, np.int32)),
        "timestamp": pa.array(t, pa.timestamp("ns", tz="UTC")),
        "interval_ns": interval,
        "cpu_time_ns": cpu_time,
        "cpu_usage_percent": cpu,
        "memory_used_bytes": mem_used,
        "memory_total_bytes": mem_total,
        "vcpus": vcpus,
        "network_rx_bytes": rx,
        "network_tx_bytes": tx,
        "disk_read_bytes": dr,
        "disk_write_bytes": dw,
        # at most 8 GiB x 1 s here: the product fits a uint64
        "mem_byte_ns": pa.array(mem_byte_ns).cast(pa.decimal128(38, 0)),
        "gap_ns": gap,
        "batch_id": _dict_col([f"b{batch_seq}"], np.zeros(n, np.int32)),
    }
    return pa.table(
        [
            pa.array(cols[f.name], f.type)
            if not isinstance(cols[f.name], pa.Array)
            else cols[f.name]
            for f in RAW_SCHEMA
        ],
        schema=RAW_SCHEMA,
    )


def billing_rows(fleet: Fleet, hours: list[datetime], version: int) -> list[BillingHourlyRow]:
    """One row per VM per hour with plausible integer usage and a Decimal cost."""
    out: list[BillingHourlyRow] = []
    for h in hours:
        for vm in range(fleet.vms):
            cpu = 600_000_000_000 + vm * 1_000_000
            mem = (1 + vm % 8) * GIB * 3_600_000_000_000 // 3
            net = 10_000_000 + vm
            cost = (
                Decimal(cpu) / Decimal(3_600_000_000_000) * Decimal("0.05")
                + Decimal(mem) / Decimal(GIB) / Decimal(3_600_000_000_000) * Decimal("0.01")
                + Decimal(net) / Decimal(GIB) * Decimal("0.10")
            ).quantize(Decimal("1e-12"))
            out.append(
                BillingHourlyRow(
                    customer_id=fleet.customer_of(vm),
                    vm_id=fleet.vm_name(vm),
                    instance_id="inst_1",
                    hour=h,
                    cpu_time_ns=cpu,
                    mem_byte_ns=mem,
                    net_rx_bytes=net,
                    net_tx_bytes=0,
                    disk_read_bytes=0,
                    disk_write_bytes=0,
                    gap_ns=0,
                    sample_count=36_000,
                    storage_byte_ns=0,
                    cost=cost,
                    pricing_version="v1",
                    version=version,
                )
            )
    return out
