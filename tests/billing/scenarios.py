"""Synthetic usage for the billing tests: series with jitter, gaps, invalid samples, restarts
(new instances) and hour/month boundaries, cut into batches like billaged does."""

from __future__ import annotations

import random
from dataclasses import dataclass

from unkey_deploy.metering.model import Batch, Sample, SeriesKey

from .reference import RawSample

GIB = 2**30
S_NS = 10**9
# 2026-10-31 23:58:00 UTC: two minutes before a month (and hour) boundary.
MONTH_EDGE_NS = 1_793_491_080 * 1_000_000_000


@dataclass
class Series:
    key: SeriesKey
    samples: list[Sample]


def make_series(  # noqa: PLR0917
    rng: random.Random,
    customer_id: str,
    vm_id: str,
    instance_id: str,
    start_ns: int,
    n: int,
    *,
    vcpus: int = 2,
    mem_total: int = 2 * GIB,
    gap_every: int = 0,
    invalid_every: int = 0,
) -> Series:
    key = SeriesKey(customer_id, vm_id, instance_id, vcpus, mem_total)
    t = start_ns
    cpu = net_rx = net_tx = dr = dw = 0
    out: list[Sample] = []
    for i in range(n):
        step = 100_000_000 + rng.randint(-300_000, 300_000)
        if gap_every and i and i % gap_every == 0:
            step = rng.choice([1_000_000_001, 2_500_000_000, 30_000_000_000])
        t += step
        cpu += rng.randint(0, vcpus * step)
        net_rx += rng.randint(0, 200_000)
        net_tx += rng.randint(0, 100_000)
        dr += rng.randint(0, 50_000)
        dw += rng.randint(0, 50_000)
        mem = rng.randint(mem_total // 4, mem_total)
        s = Sample(t, cpu, mem, net_rx, net_tx, dr, dw)
        if invalid_every and i and i % invalid_every == 0:
            kind = rng.randrange(3)
            if kind == 0:  # memory above the allocation
                s = Sample(t, cpu, mem_total + 4096, net_rx, net_tx, dr, dw)
            elif kind == 1:  # a counter going down
                s = Sample(
                    t,
                    max(cpu - 10_000_000, 0) if cpu >= 10_000_000 else cpu,
                    mem,
                    max(net_rx - 1000, 0),
                    net_tx,
                    dr,
                    dw,
                )
                if s.net_rx_bytes == net_rx and s.cpu_time_ns == cpu:
                    s = Sample(t, cpu, mem_total + 1, net_rx, net_tx, dr, dw)
            else:  # CPU over 100 %: a spike of 3 x vcpus x step (not kept in the counter)
                s = Sample(t, cpu + 3 * vcpus * step + 1, mem, net_rx, net_tx, dr, dw)
        out.append(s)
    return Series(key, out)


def big_series(rng: random.Random, key: SeriesKey, start_ns: int, minutes: int) -> Series:
    """A sample every 30 s (gaps: no memory billed) with large CPU and network counters, so
    each line is dollars, plus a 100 ms stretch every 10 minutes (memory billed)."""
    t = start_ns
    cpu = rx = tx = 0
    out: list[Sample] = []
    for i in range(minutes * 2):
        steps = [30 * S_NS] if i % 20 else [30 * S_NS - 5 * S_NS, *[100_000_000] * 50]
        for step in steps:
            t += step
            cpu += rng.randint(0, key.vcpus * step)
            rx += rng.randint(0, GIB)
            tx += rng.randint(0, GIB // 4)
            mem = rng.randint(key.memory_total_bytes // 4, key.memory_total_bytes)
            out.append(Sample(t, cpu, mem, rx, tx, 0, 0))
    return Series(key, out)


def to_batches(series: Series, size: int = 600) -> list[Batch]:
    return [
        Batch(series.key, seq, tuple(series.samples[i : i + size]))
        for seq, i in enumerate(range(0, len(series.samples), size))
    ]


def raw_of(series_list: list[Series]) -> list[RawSample]:
    return [
        RawSample(
            s.key.customer_id,
            s.key.vm_id,
            s.key.instance_id,
            s.key.vcpus,
            s.key.memory_total_bytes,
            x.t,
            x.cpu_time_ns,
            x.memory_used_bytes,
            x.net_rx_bytes,
            x.net_tx_bytes,
            x.disk_read_bytes,
            x.disk_write_bytes,
        )
        for s in series_list
        for x in s.samples
    ]
