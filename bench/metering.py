"""Metering throughput and cost, measured on this machine.

    .venv/bin/python bench/metering.py --vms 100000 --seconds 90 [--no-journal]
        [--collector-vms 100]

1. A simulated fleet (``unkey_deploy.metering.sim.SimFleet``) of ``--vms`` VMs sampled every
   simulated 100 ms for ``--seconds`` simulated seconds, run as fast as the machine allows,
   through the real billaged (journal, 600-sample buffers, codec v1, fsync'd spool) and
   published to a real local nats-server (JetStream, file storage, publish pipelining). VM
   ``i`` starts at tick ``i % 600`` so batch boundaries are spread as in a real fleet; the
   measurement window starts once every VM is running (tick 600) and ends when the spool is
   drained. ``samples_per_s`` >= vms*10 means the pipeline keeps up with real time.
   ``cpu_cores`` = CPU of billaged (this process minus the simulator's sample generation) +
   nats-server over the window / wall time; ``samples_per_core_s`` = samples per CPU-second of
   that, the rate one uncontended core sustains (the box is shared: see ``load_avg_1m``).
   Baseline in the same run: the design's row layout (56-byte rows + zstd) on the same samples.
2. The real collector's cost: ``--collector-vms`` real processes, each in its own cgroup (v1
   cpuacct + memory) with its own veth interface, sampled at 10 Hz; CPU of the
   sweeps per second of wall time, as % of one core per 100 VMs. Baseline in the same run: the
   same files opened, read and closed every time (what the notes measured). Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

from unkey_deploy.bus import NatsServer, connect
from unkey_deploy.core.config import BusConfig
from unkey_deploy.metering.billaged import Billaged
from unkey_deploy.metering.collector import Collector, sweep_cost
from unkey_deploy.metering.model import MeterTarget, SeriesKey
from unkey_deploy.metering.sim import SimFleet

BATCH = 600


def proc_cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def row_layout_bytes_per_sample(fleet: SimFleet, ticks: int, vms: int = 200) -> float:
    """The design's layout: fixed 56-byte rows, zstd level 3, one frame per 600-sample batch."""
    zc = zstandard.ZstdCompressor(level=3)
    idx = np.arange(min(vms, fleet.n))
    rows = np.stack([fleet.rows(k, idx) for k in range(min(ticks, BATCH))], axis=1)
    total = sum(len(zc.compress(rows[i].astype("<i8").tobytes())) for i in range(len(idx)))
    return total / rows[:, :, 0].size


async def fleet_bench(n: int, seconds: int, journal: bool, work: Path) -> dict[str, float]:
    server = NatsServer(work / "nats")
    server.start()
    try:

        async def factory() -> object:
            return await connect(server.url)

        b = Billaged(
            work / "spool",
            bus_factory=factory,  # type: ignore[arg-type]
            bus_config=BusConfig(max_age_s=3600, duplicate_window_s=120),
            journal=journal,
            rotate_ticks=100,
            publish_chunk=4000,
            capacity=n,
        )
        fleet = SimFleet(n)
        slots = np.array([b.slot(k) for k in fleet.keys])
        phase = np.arange(n) % BATCH
        publisher = asyncio.create_task(b.run_publisher(idle_s=0.05))
        ticks = seconds * 10
        if ticks <= BATCH:
            raise SystemExit("--seconds must exceed 60 (one batch) to measure steady state")
        t0 = cpu0 = nats0 = sim_cpu = 0.0
        pub0 = bytes0 = 0
        for k in range(ticks):
            if k == BATCH:
                t0, cpu0, nats0 = time.monotonic(), time.process_time(), proc_cpu_s(server.pid or 0)
                pub0, bytes0 = b.stats.samples_published, b.stats.bytes_published
                sim_cpu = 0.0
            c = time.process_time()
            sel = np.flatnonzero(phase <= k) if k < BATCH else None
            rows = fleet.rows(k, sel)
            sim_cpu += time.process_time() - c  # generating the fleet's samples is not billaged
            b.ingest(slots if sel is None else slots[sel], rows)
            await asyncio.sleep(0)
        b.stop_publisher()
        await publisher
        if not await b.drain(600):
            raise SystemExit("spool did not drain")
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        nats_cpu = proc_cpu_s(server.pid or 0) - nats0
        samples = b.stats.samples_published - pub0
        pipeline_cpu = cpu - sim_cpu + nats_cpu
        out = {
            "samples_per_s": samples / wall,
            "bytes_per_sample": (b.stats.bytes_published - bytes0) / samples,
            # billaged + nats-server, without the simulator's own sample generation
            "cpu_cores": pipeline_cpu / wall,
            # what one fully available core sustains (this box is shared; see load_avg)
            "samples_per_core_s": samples / pipeline_cpu,
            "sim_cores": sim_cpu / wall,
            "billaged_cores": (cpu - sim_cpu) / wall,
            "nats_cores": nats_cpu / wall,
            "batches_per_s": samples / BATCH / wall,
            "rejected": b.stats.rejected,
            "baseline_row_bytes_per_sample": row_layout_bytes_per_sample(fleet, ticks),
            "load_avg_1m": os.getloadavg()[0],
        }
        await b.close()
        return out
    finally:
        server.stop()


def _own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    return Path("/sys/fs/cgroup/memory")


def naive_sweep_cost(targets: list[MeterTarget], sweeps: int) -> float:
    """Baseline: open + read + close every file on every sweep."""

    def rd(p: Path) -> int:
        with p.open("rb") as f:
            return int(f.read().split()[0])

    start_cpu, start = time.process_time(), time.monotonic()
    for i in range(sweeps):
        for t in targets:
            assert t.cgroup_v1_cpuacct_dir and t.cgroup_v1_memory_dir and t.host_iface
            rd(t.cgroup_v1_cpuacct_dir / "cpuacct.usage")
            rd(t.cgroup_v1_memory_dir / "memory.usage_in_bytes")
            net = Path("/sys/class/net") / t.host_iface / "statistics"
            rd(net / "rx_bytes")
            rd(net / "tx_bytes")
        delay = start + (i + 1) * 0.1 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return (time.process_time() - start_cpu) / (time.monotonic() - start)


def collector_bench(n: int, seconds: float) -> dict[str, float]:
    if os.geteuid() != 0:
        print("collector bench skipped: needs root (cgroups, interfaces)", file=sys.stderr)
        return {}
    tag = secrets.token_hex(2)
    mem_root = _own_memory_cgroup()
    dirs: list[Path] = []
    procs: list[subprocess.Popen[bytes]] = []
    ifaces: list[str] = []
    targets: list[MeterTarget] = []
    try:
        for i in range(n):
            name = f"unkey-bench-{tag}-{i}"
            acct = Path("/sys/fs/cgroup/cpuacct") / name
            mem = mem_root / name
            for d in (acct, mem):
                d.mkdir()
                dirs.append(d)
            iface = f"ub{tag}{i}"
            subprocess.run(
                ["ip", "link", "add", iface, "type", "veth", "peer", "name", f"{iface}p"],
                check=True,
            )
            ifaces.append(iface)
            p = subprocess.Popen(
                ["sh", "-c", f"echo $$ > {acct}/cgroup.procs && echo $$ > {mem}/cgroup.procs"
                 " && exec sleep 3600"]
            )  # fmt: skip
            procs.append(p)
            key = SeriesKey(f"cust_b{i % 10}", f"vm_b{i}", f"inst_b{i}", 1, 1 << 30)
            targets.append(
                MeterTarget(key=key, pid=p.pid, cgroup_v1_cpuacct_dir=acct,
                            cgroup_v1_memory_dir=mem, host_iface=iface)
            )  # fmt: skip
        time.sleep(0.5)
        c = Collector()
        c.set_targets(targets)
        sweeps = int(seconds * 10)
        cost = sweep_cost(c, sweeps)
        keys, rows = c.sample()
        assert len(keys) == n and (rows[:, 2] > 0).all(), "collector read nothing"
        c.close()
        naive = naive_sweep_cost(targets, sweeps)
        return {
            "collector_cpu_pct_per_100vms": cost * 100 * 100 / n,
            "baseline_open_read_close_cpu_pct_per_100vms": naive * 100 * 100 / n,
        }
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for iface in ifaces:
            subprocess.run(["ip", "link", "del", iface], check=False)
        for d in dirs:
            with contextlib.suppress(OSError):
                d.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--seconds", type=int, default=90, help="simulated seconds (> 60)")
    ap.add_argument("--no-journal", action="store_true")
    ap.add_argument("--collector-vms", type=int, default=100)
    ap.add_argument("--collector-seconds", type=float, default=5.0)
    args = ap.parse_args()
    results: dict[str, float] = {}
    if args.collector_vms:
        results.update(collector_bench(args.collector_vms, args.collector_seconds))
        print("collector:", results, file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="unkey-bench-metering-"))
    try:
        fleet = asyncio.run(fleet_bench(args.vms, args.seconds, not args.no_journal, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.update(fleet)
    fields = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()
    )
    print(f"RESULT vms={args.vms} journal={int(not args.no_journal)} {fields}")


if __name__ == "__main__":
    main()
