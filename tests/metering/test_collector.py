"""The collector on real processes in real cgroups, a real veth pair and a real QEMU."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from unkey_deploy.bus import NatsServer, connect
from unkey_deploy.core.errors import InvalidInput
from unkey_deploy.metering import codec
from unkey_deploy.metering import stream as mstream
from unkey_deploy.metering.billaged import Billaged
from unkey_deploy.metering.collector import Collector, FirecrackerMetrics, QmpBlockstats
from unkey_deploy.metering.model import MeterTarget, SeriesKey
from unkey_deploy.metering.service import MeteringLoop
from unkey_deploy.metering.sim import checksum

pytestmark = pytest.mark.root
CG = Path("/sys/fs/cgroup")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for cgroups and netns")


def _own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            return CG / "memory" / path.lstrip("/")
    raise AssertionError("no v1 memory cgroup")


class Cgroups:
    """Fresh v1 cpu/cpuacct/memory cgroups (and a v2 one in the unified tree) for one test."""

    def __init__(self) -> None:
        name = f"unkey-mt-{secrets.token_hex(4)}"
        self.cpu = CG / "cpu" / name
        self.cpuacct = CG / "cpuacct" / name
        self.memory = _own_memory_cgroup() / name
        self.v2 = CG / "unified" / name
        self.dirs = [self.cpu, self.cpuacct, self.memory, self.v2]
        for d in self.dirs:
            d.mkdir()
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, code: str) -> subprocess.Popen[bytes]:
        """Run python ``code`` inside every cgroup from its first instruction."""
        join = " && ".join(f"echo $$ > {d}/cgroup.procs" for d in self.dirs)
        p = subprocess.Popen(["sh", "-c", f'{join} && exec "$0" -c "$1"', sys.executable, code])
        self.procs.append(p)
        return p

    def close(self) -> None:
        # kill everything inside (children a test process forked too), then remove the dirs
        for _ in range(100):
            pids = {int(p) for d in self.dirs for p in (d / "cgroup.procs").read_text().split()}
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for p in self.procs:
            p.kill()
            p.wait()
        for d in self.dirs:
            for attempt in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    if attempt == 49:
                        raise
                    time.sleep(0.05)


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    if os.geteuid() != 0:
        pytest.skip("needs root for cgroups")
    cg = Cgroups()
    try:
        yield cg
    finally:
        cg.close()


def _key(name: str, vcpus: int = 1) -> SeriesKey:
    return SeriesKey(f"cust_{name}", f"vm_{name}", f"inst_{name}", vcpus, 1 << 30)


def _sample_for(collector: Collector, seconds: float) -> tuple[list[SeriesKey], np.ndarray]:
    keys: list[SeriesKey] = []
    rows = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        keys, r = collector.sample()
        rows.append(r)
        time.sleep(0.1)
    return keys, np.stack(rows)  # (ticks, vms, 7)


def _proc_cpu_ns(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(f[11]) + int(f[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


BURN = "import os\nb = b'x' * (64 << 20)\nos.fork()\nwhile True: pass\n"  # 2 busy processes


def test_cpu_near_limit_when_burning_and_near_zero_when_idle(cgroups: Cgroups) -> None:
    # 2 busy processes capped at 0.5 CPU (CFS quota). Half a core rather than a whole one so
    # that the cap, not the other jobs on this shared 2-core box, is what limits the burner.
    (cgroups.cpu / "cpu.cfs_period_us").write_text("100000")
    (cgroups.cpu / "cpu.cfs_quota_us").write_text("50000")
    # ... and weighted 10x the default, so a busy box (other jobs in the root cgroup) cannot
    # starve it below its cap: what is measured is the cap.
    (cgroups.cpu / "cpu.shares").write_text("10240")
    burner = cgroups.spawn(BURN)
    idle_cg = Cgroups()
    try:
        idle = idle_cg.spawn("import time\nwhile True: time.sleep(1)\n")
        time.sleep(0.5)  # let both start (and the burner fill its 64 MiB)
        burn_v1 = MeterTarget(
            key=_key("burn"),
            pid=burner.pid,
            cgroup_v1_cpuacct_dir=cgroups.cpuacct,
            cgroup_v1_memory_dir=cgroups.memory,
        )
        burn_v2 = MeterTarget(
            key=_key("burnv2"),
            pid=burner.pid,
            cgroup_v2_dir=cgroups.v2,
            cgroup_v1_memory_dir=cgroups.memory,
        )
        idle_t = MeterTarget(
            key=_key("idle"),
            pid=idle.pid,
            cgroup_v1_cpuacct_dir=idle_cg.cpuacct,
            cgroup_v1_memory_dir=idle_cg.memory,
        )
        collector = Collector()
        collector.set_targets([burn_v1, burn_v2, idle_t])
        pids = [int(p) for p in (cgroups.cpuacct / "cgroup.procs").read_text().split()]
        assert len(pids) == 2
        proc_before = sum(_proc_cpu_ns(p) for p in pids)
        keys, rows = _sample_for(collector, 3.0)
        proc_after = sum(_proc_cpu_ns(p) for p in pids)
        collector.close()
    finally:
        idle_cg.close()
    assert [k.vm_id for k in keys] == ["vm_burn", "vm_burnv2", "vm_idle"]
    assert rows.shape[0] >= 25
    dt = rows[-1, :, 0] - rows[0, :, 0]
    dcpu = rows[-1, :, 1] - rows[0, :, 1]
    share = dcpu / dt
    assert 0.35 < share[0] <= 0.56, f"burner used {share[0]:.2f} CPU under a 0.5 CPU cap"
    assert abs(share[1] - share[0]) < 0.05, "v2 cpu.stat disagrees with v1 cpuacct"
    assert share[2] < 0.02, f"idle process used {share[2]:.3f} CPU"
    # the kernel's per-process accounting agrees with the cgroup counter
    assert abs((proc_after - proc_before) - dcpu[0]) < 0.1 * dcpu[0] + 30_000_000
    # counters are cumulative and timestamps strictly increase
    assert (np.diff(rows[:, :, 1], axis=0) >= 0).all()
    assert (np.diff(rows[:, :, 0], axis=0) > 0).all()
    # the burner's 64 MiB (x2 after fork, copy-on-write so shared) is in its working set
    mem = rows[-1, 0, 2]
    assert 64 << 20 <= mem < 256 << 20, mem
    assert rows[-1, 2, 2] < mem


@pytest.fixture
def veth() -> Iterator[tuple[str, str, str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for netns")
    tag = secrets.token_hex(3)
    ns, host, guest = f"unkmt{tag}", f"umh{tag}", f"umg{tag}"
    octet = secrets.randbelow(60) * 4
    host_ip, guest_ip = f"10.251.{octet}.1", f"10.251.{octet}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", host, "type", "veth", "peer", "name", guest)
        ip("link", "set", guest, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host)
        ip("link", "set", host, "up")
        ip("-n", ns, "addr", "add", f"{guest_ip}/30", "dev", guest)
        ip("-n", ns, "link", "set", guest, "up")
        yield ns, host, host_ip, guest_ip
    finally:
        subprocess.run(["ip", "link", "del", host], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_without_cgroups_the_process_tree_is_metered() -> None:
    """A host without cgroups (metald not root): the VM's pid is a launcher whose work runs in
    its children (a sandbox's bwrap, init and app). Their CPU and memory count, and the CPU does
    not drop when a child exits and its time moves into its parent."""
    code = (
        "import os, time\n"
        "def burn(s):\n"
        "    b = b'x' * (48 << 20)\n"
        "    end = time.process_time() + s\n"
        "    while time.process_time() < end: pass\n"
        "kid = os.fork()\n"
        "if kid == 0:\n"
        "    burn(0.6); os._exit(0)\n"
        "time.sleep(1.0)\n"  # the launcher itself idles, its child works then exits
        "os.waitpid(kid, 0)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    c = Collector()
    try:
        c.set_targets([MeterTarget(key=_key("tree"), pid=proc.pid)])
        _, rows = _sample_for(c, 1.6)  # the child's 0.6 s of CPU, its exit and reaping
    finally:
        c.close()
        launcher_cpu = _proc_cpu_ns(proc.pid)
        proc.kill()
        proc.wait()
    cpu, mem = rows[:, 0, 1], rows[:, 0, 2]
    assert (np.diff(cpu) >= 0).all(), "never down, across the child's exit"
    assert cpu[-1] - cpu[0] >= 0.4e9, f"the child's CPU counted: {(cpu[-1] - cpu[0]) / 1e9}"
    assert launcher_cpu < 0.3e9, "(the launcher's own CPU alone would be ~0)"
    assert mem.max() > 48 << 20, "the child's memory counted while it ran"


def test_network_bytes_grow_with_traffic(veth: tuple[str, str, str, str]) -> None:
    ns, host_if, host_ip, guest_ip = veth
    app = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "60"])
    try:
        target = MeterTarget(key=_key("net"), pid=app.pid, host_iface=host_if)
        collector = Collector()
        collector.set_targets([target])
        _, before = collector.sample()
        # 2 MB towards the "VM" (host side transmits), 1 MB from it (host side receives); in
        # bursts of 50 datagrams, which the receiving side's backlog (1000 packets) always
        # takes: a busy machine drops a blast of 2000 there, and a dropped one is not counted
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(2000):
                s.sendto(b"x" * 1000, (guest_ip, 9))
                if i % 50 == 49:
                    time.sleep(0.002)
        send = (
            "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(1000):\n"
            f"    s.sendto(b'y' * 1000, ('{host_ip}', 9))\n"
            "    if i % 50 == 49: time.sleep(0.002)\n"
        )
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", send], check=True)
        time.sleep(0.2)
        _, after = collector.sample()
        collector.close()
    finally:
        app.kill()
        app.wait()
    rx = int(after[0, 3] - before[0, 3])
    tx = int(after[0, 4] - before[0, 4])
    assert 2_000_000 <= rx < 2_300_000, rx  # UDP/IP/Ethernet headers on top of the payload
    assert 1_000_000 <= tx < 1_200_000, tx


def test_qmp_blockstats_count_what_the_vm_reads(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 is a declared dependency of this project")
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    mon, ctl = tmp_path / "m.sock", tmp_path / "c.sock"
    vm = subprocess.Popen(
        [qemu, "-machine", "pc", "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
         "-S", "-drive", f"file={img},format=raw,if=ide",
         "-qmp", f"unix:{mon},server=on,wait=off", "-qmp", f"unix:{ctl},server=on,wait=off"],
    )  # fmt: skip
    try:
        for _ in range(100):
            if mon.exists() and ctl.exists():
                break
            time.sleep(0.05)
        reader = QmpBlockstats(mon)
        assert reader.read() == (0, 0)  # paused before the firmware ran
        sock = reader._sock
        control = QmpBlockstats(ctl)
        control._connect()
        control._call("cont")  # SeaBIOS now reads the boot sector
        for _ in range(100):
            got = reader.read()
            if got and got[0]:
                break
            time.sleep(0.05)
        assert got is not None and got[0] >= 512 and got[1] == 0
        assert reader._sock is sock  # one persistent connection
        control.close()
        reader.close()
    finally:
        vm.kill()
        vm.wait()


def test_firecracker_metrics_are_accumulated(tmp_path: Path) -> None:
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    reader = FirecrackerMetrics(fifo)
    assert reader.read() == (0, 0)
    w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        # Firecracker writes one JSON object per flush; block counters restart at each flush
        line = {"utc_timestamp_ms": 1, "block": {"read_bytes": 4096, "write_bytes": 512},
                "block_rootfs": {"read_bytes": 4096, "write_bytes": 512}}  # fmt: skip
        os.write(w, json.dumps(line).encode() + b"\n")
        assert reader.read() == (4096, 512)
        line["block"] = {"read_bytes": 100, "write_bytes": 0}
        data = json.dumps(line).encode() + b"\n"
        os.write(w, data[:10])  # a line split across reads
        assert reader.read() == (4096, 512)
        os.write(w, data[10:])
        assert reader.read() == (4196, 512)
    finally:
        os.close(w)
        reader.close()


def test_counters_reset_and_baseline(tmp_path: Path, cgroups: Cgroups) -> None:
    """A counter that existed before the instance starts from 0; a counter that goes down
    (re-created) keeps the series cumulative."""
    burnt_marker = tmp_path / "burnt"
    p = cgroups.spawn(
        f"import time\nx = sum(range(10**7))\nopen({str(burnt_marker)!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    deadline = time.monotonic() + 120  # a loaded machine may take long to run it
    while not burnt_marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert burnt_marker.exists(), "the process never finished its CPU burn"
    burnt = _proc_cpu_ns(p.pid)  # CPU time before "boot" (10 ms ticks)
    assert burnt > 20_000_000  # else the next checks could not tell a baseline from none
    t = MeterTarget(
        key=_key("base"), pid=p.pid, cgroup_v1_cpuacct_dir=cgroups.cpuacct,
        baseline_at_first_read=True,
    )  # fmt: skip
    c = Collector()
    c.set_targets([t])
    _, first = c.sample()
    assert first[0, 1] == 0  # the CPU burnt before "boot" is not this instance's
    c2 = Collector()
    c2.set_targets(
        [MeterTarget(key=_key("boot"), pid=p.pid, cgroup_v1_cpuacct_dir=cgroups.cpuacct)]
    )
    _, whole = c2.sample()
    assert whole[0, 1] >= burnt - 20_000_000  # counted from boot (all the burn, +- 2 ticks)
    reader = c2._order[0]
    real = reader.read_raw
    reader.read_raw = lambda: [v // 2 if i == 0 else v for i, v in enumerate(real())]  # type: ignore[method-assign]
    _, after_reset = c2.sample()
    assert after_reset[0, 1] >= whole[0, 1]
    c.close()
    c2.close()


def test_metering_loop_real_collector_to_consumer(cgroups: Cgroups, tmp_path: Path) -> None:
    """The real collector on real processes -> billaged -> JetStream -> a consumer that sees
    exactly the samples the collector produced."""
    procs = [cgroups.spawn("import time\nwhile True: sum(range(10**5)); time.sleep(0.01)\n")]
    time.sleep(0.3)
    targets = [
        MeterTarget(key=_key(f"loop{i}"), pid=procs[0].pid, cgroup_v1_cpuacct_dir=cgroups.cpuacct,
                    cgroup_v1_memory_dir=cgroups.memory)
        for i in range(3)
    ]  # fmt: skip
    produced: list[np.ndarray] = []
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:

        async def factory() -> object:
            return await connect(server.url)

        async def main() -> None:
            b = Billaged(tmp_path / "spool", bus_factory=factory, batch_samples=7)  # type: ignore[arg-type]
            collector = Collector()
            real = collector.sample

            def recording() -> tuple[list[SeriesKey], np.ndarray]:
                keys, rows = real()
                produced.append(rows.copy())
                return keys, rows

            collector.sample = recording  # type: ignore[method-assign]
            current = list(targets)
            loop = MeteringLoop(collector, b, lambda: current, targets_every=5)
            stop = asyncio.Event()
            task = asyncio.create_task(loop.run(stop))
            await asyncio.sleep(1.2)
            current = current[:2]  # one VM stops: its partial batch is flushed
            await asyncio.sleep(1.0)
            stop.set()
            await task
            assert await b.drain(30)
            await b.close()
            bus = await connect(server.url)
            cons = await bus.consumer(mstream.STREAM_NAME, mstream.consumer_spec("t"))
            got, ids = [], []
            while msgs := await cons.fetch(100, 1.0):
                for m in msgs:
                    d = codec.decode_array(m.data)
                    got.append(d.samples)
                    ids.append(d.batch_id)
                    await m.ack()
            await bus.close()
            assert len(ids) == len(set(ids))
            assert checksum(got) == checksum(produced)
            assert checksum(got)[0] > 40

        asyncio.run(main())
    finally:
        server.stop()


def test_metering_restart_continues_series_and_a_refused_one_stops_no_other(
    cgroups: Cgroups, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """metald restarting with its VMs running: the loop stops without retiring (partial batches
    spooled) and the next one continues every series, nothing sampled twice or lost. A series
    billaged refuses (retired while its VM ran on) is logged and skipped; the others go on."""
    proc = cgroups.spawn("import time\nwhile True: sum(range(10**5)); time.sleep(0.01)\n")
    time.sleep(0.2)
    keys = [_key("restart0"), _key("restart1"), _key("restart2")]
    targets = [MeterTarget(key=k, pid=proc.pid, cgroup_v1_cpuacct_dir=cgroups.cpuacct,
                           cgroup_v1_memory_dir=cgroups.memory) for k in keys]  # fmt: skip
    spool = tmp_path / "spool"

    async def run_loop(seconds: float) -> None:
        b = Billaged(spool, batch_samples=4)
        loop = MeteringLoop(Collector(), b, lambda: targets, targets_every=5)
        stop = asyncio.Event()
        task = asyncio.create_task(loop.run(stop, retire=False))
        await asyncio.sleep(seconds)
        stop.set()
        await task
        await b.close()

    async def main() -> None:
        await run_loop(0.55)  # ~6 samples a series: one full batch, a partial one spooled
        b = Billaged(spool, batch_samples=4)
        b.stop(keys[0])  # as a metald of before this fix did on SIGTERM
        await b.close()
        await run_loop(0.55)

    with caplog.at_level("ERROR", logger="unkey.metering"):
        asyncio.run(main())
    b = Billaged(spool, batch_samples=4)
    by_series: dict[str, list[tuple[int, np.ndarray]]] = {}
    for _, _, item in b.spool.pending(1000):
        d = codec.decode_array(item.data)
        by_series.setdefault(d.key.vm_id, []).append((d.seq, d.samples))
    asyncio.run(b.close())
    for vm_id in ("vm_restart1", "vm_restart2"):  # continued across the restart
        batches = sorted(by_series[vm_id], key=lambda x: x[0])
        assert [seq for seq, _ in batches] == list(range(len(batches)))
        ts = np.concatenate([s[:, 0] for _, s in batches])
        assert len(ts) >= 9, "both runs sampled it"
        assert (np.diff(ts) > 0).all(), "no sample twice, time only forward"
    # the refused series has only what the first run sampled; its refusal is logged
    first_run = sum(len(s) for _, s in by_series["vm_restart0"])
    assert 3 <= first_run < len(np.concatenate([s for _, s in by_series["vm_restart1"]]))
    assert any("VM not metered" in r.getMessage() for r in caplog.records)


def test_metering_goes_on_when_its_targets_cannot_be_read(
    cgroups: Cgroups, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The control-plane database away for a moment (the targets lookup raises): the VMs
    already known are sampled on, the failure is logged, and the next lookup that works
    applies (a VM gone meanwhile ends its series then)."""
    proc = cgroups.spawn("import time\nwhile True: sum(range(10**5)); time.sleep(0.01)\n")
    time.sleep(0.2)
    keys = [_key("dbaway0"), _key("dbaway1")]
    targets = [MeterTarget(key=k, pid=proc.pid, cgroup_v1_cpuacct_dir=cgroups.cpuacct,
                           cgroup_v1_memory_dir=cgroups.memory) for k in keys]  # fmt: skip
    answers: list[list[MeterTarget] | Exception] = [
        targets, RuntimeError("database is locked"), RuntimeError("database is locked"),
        targets[:1],
    ]  # fmt: skip

    def lookup() -> list[MeterTarget]:
        a = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(a, Exception):
            raise a
        return a

    b = Billaged(tmp_path / "spool", batch_samples=1000)
    loop = MeteringLoop(Collector(), b, lookup, targets_every=1)
    with caplog.at_level("WARNING", logger="unkey.metering"):
        assert loop.tick() == 2  # both known
        assert loop.tick() == 2  # lookup failed: both still sampled
        assert loop.tick() == 2
        assert b.series_count == 2
        assert loop.tick() == 1  # it works again: dbaway1's VM is gone, its series ends
    assert b.series_count == 1
    failed = [r for r in caplog.records if r.getMessage() == "metering targets not refreshed"]
    assert len(failed) == 2
    loop.collector.close()
    asyncio.run(b.close())


def test_a_sampling_interval_of_a_second_or_more_is_refused(tmp_path: Path) -> None:
    # BILLING.md bills memory only over intervals of at most 1 s (longer ones are gaps), and
    # metering.interval_ms has no upper bound: sampling every 1 s or slower metered every VM's
    # memory as nothing but gaps, and not a single byte of it was billed.
    b = Billaged(tmp_path / "spool", journal=False)
    try:
        with pytest.raises(InvalidInput, match="interval"):
            MeteringLoop(Collector(), b, list, interval_s=1.0)
        MeteringLoop(Collector(), b, list, interval_s=0.5)
    finally:
        asyncio.run(b.close())
