"""A simulated fleet: a deterministic sample source, and a billaged runner fed by it.

Sample ``k`` of VM ``i`` is a pure function of (seed, i, k), so a test can recompute exactly what
the source produced and compare it with what a consumer received (count and checksum), and so
the source can resume where billaged's durable state ends after billaged was killed.

    python -m unkey_deploy.metering.sim --spool DIR --nats-url URL --vms 20 --ticks 1500 \
        --tick-interval-s 0.005 --progress FILE

exits 0 once every series was stopped (partial batches flushed) and the spool is drained.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..bus.jetstream import connect
from ..core.config import BusConfig
from .billaged import Billaged
from .codec import NCOLS, Samples
from .model import SeriesKey

T0 = 1_780_000_000_000_000_000  # 2026-05-28, a fixed epoch for the simulated clock
TICK_NS = 100_000_000
MEM_TOTAL = 1 << 30


class SimFleet:
    """``n`` simulated VMs (customers ``cust_sim<j>``, 10 VMs per customer)."""

    def __init__(self, n: int, seed: int = 0, customers: int | None = None) -> None:
        self.n = n
        self.seed = seed
        ncust = customers or max(1, n // 10)
        idx = np.arange(n, dtype=np.int64)
        self.keys = [
            SeriesKey(
                customer_id=f"cust_sim{seed}x{i % ncust}",
                vm_id=f"vm_sim{seed}x{i}",
                instance_id=f"inst_sim{seed}x{i}",
                vcpus=1 + int(i % 4),
                memory_total_bytes=MEM_TOTAL,
            )
            for i in range(n)
        ]
        rng = np.random.default_rng(seed)
        self._rate = rng.integers(1_000, 50_000_000, size=(n, NCOLS), dtype=np.int64)
        self._rate[:, 0] = TICK_NS
        self._idx = idx

    def rows(self, k: int, vms: np.ndarray | None = None) -> Samples:
        """Sample ``k`` of each VM in ``vms`` (all by default) as an (n, 7) array.

        Realistic entropy (so compression figures mean something): every counter grows by a
        pseudo-random 0..2x its VM's rate per tick, timestamps jitter by up to 1 ms, memory is
        page-aligned and changes every 5 s. Still a pure function of (seed, vm, k)."""
        i = self._idx if vms is None else np.asarray(vms, dtype=np.int64)
        rate = self._rate[i]
        cols = np.arange(NCOLS, dtype=np.uint64)
        h = _mix(
            (np.uint64(self.seed) << np.uint64(48))
            ^ (i.astype(np.uint64)[:, None] << np.uint64(24))
            ^ (np.uint64(k) << np.uint64(3))
            ^ cols
        )
        noise = (h % rate.astype(np.uint64)).astype(np.int64)  # 0 <= noise < rate
        out = rate * k + noise  # out(k+1) - out(k) = rate + noise' - noise, in 1..2*rate-1
        out[:, 0] = T0 + k * TICK_NS + (noise[:, 0] % 1_000_000)  # up to 1 ms of jitter
        slow = _mix((i.astype(np.uint64) << np.uint64(20)) ^ np.uint64(k // 50 + 1))
        pages = (slow % np.uint64(MEM_TOTAL // 2 // 4096)).astype(np.int64)
        out[:, 2] = (MEM_TOTAL // 4) + pages * 4096  # gauge within 1/4..3/4 of the total
        return np.asarray(out, dtype=np.int64)

    def tick_of(self, t: int, vm: int) -> int:
        return (t - T0) // TICK_NS


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.asarray(x ^ (x >> np.uint64(31)), dtype=np.uint64)


def checksum(rows: Iterable[Samples]) -> tuple[int, str]:
    """(count, digest) of a set of samples, independent of order and batching."""
    arrs = [np.asarray(r, dtype=np.int64).reshape(-1, NCOLS) for r in rows]
    if not arrs:
        return 0, hashlib.sha256().hexdigest()
    allr = np.concatenate(arrs)
    order = np.lexsort(allr.T[::-1])
    return len(allr), hashlib.sha256(allr[order].tobytes()).hexdigest()


def expected(fleet: SimFleet, ticks: int) -> tuple[int, str]:
    return checksum(fleet.rows(k) for k in range(ticks))


async def run(args: argparse.Namespace) -> int:
    fleet = SimFleet(args.vms, seed=args.seed)
    url = args.nats_url

    async def factory() -> object:
        return await connect(url)

    b = Billaged(
        Path(args.spool),
        bus_factory=factory,  # type: ignore[arg-type]
        bus_config=BusConfig(duplicate_window_s=3600, max_age_s=3600),
        batch_samples=args.batch_samples,
    )
    slots = np.array([b.slot(k) for k in fleet.keys])
    # Resume each VM after the last sample billaged holds durably (journal or spool).
    start = np.array(
        [fleet.tick_of(b.last_t(k), i) + 1 if b.last_t(k) else 0 for i, k in enumerate(fleet.keys)]
    )
    publisher = asyncio.create_task(b.run_publisher())
    progress = open(args.progress, "a") if args.progress else None  # noqa: SIM115
    if progress:
        progress.write(f"start {int(start.min())}\n")
        progress.flush()
    for k in range(int(start.min()), args.ticks):
        sel = start <= k
        b.ingest(slots[sel], fleet.rows(k, np.flatnonzero(sel)))
        if progress:
            progress.write(f"{k}\n")
            progress.flush()
        await asyncio.sleep(args.tick_interval_s)
    for key in fleet.keys:
        b.stop(key)
    ok = await b.drain(args.drain_timeout_s)
    publisher.cancel()
    with_stats = b.stats
    await b.close()
    if progress:
        progress.write(f"done {with_stats}\n")
        progress.close()
    return 0 if ok else 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unkey_deploy.metering.sim")
    p.add_argument("--spool", required=True)
    p.add_argument("--nats-url", required=True)
    p.add_argument("--vms", type=int, default=10)
    p.add_argument("--ticks", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-samples", type=int, default=600)
    p.add_argument("--tick-interval-s", type=float, default=0.005)
    p.add_argument("--drain-timeout-s", type=float, default=120.0)
    p.add_argument("--progress")
    args = p.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
