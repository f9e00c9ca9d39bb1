"""metald's collector: host-side counters of every running VM instance, ten times a second.

What is read, per :class:`~unkey_deploy.metering.model.MeterTarget` (files stay open; each read
is one ``os.pread`` at offset 0, ~1 µs here):

- **CPU time**: cgroup v2 ``cpu.stat`` ``usage_usec`` (x1000), else cgroup v1
  ``cpuacct.usage`` (ns), else (a host without cgroups: metald not root) the process tree
  of the VM's pid, each process's utime+stime+cutime+cstime from ``/proc/<pid>/stat`` (clock
  ticks; a reaped child's time moves into its parent's cutime). Parents are read before their
  children, so a child reaped during a read is missed once (a dip) rather than counted twice;
  the sum is held at its highest, never taken for a counter reset. (A read that lands inside
  the kernel's reap itself, between the parent's cutime update and the child's removal, could
  still count that child twice until the VM's usage catches up: bounded by one child's CPU, and
  only here, without cgroups.)
- **Memory** (gauge): the *working set*, as kubelet/cAdvisor define it: cgroup usage
  (v2 ``memory.current`` or v1 ``memory.usage_in_bytes``) minus ``inactive_file`` from
  ``memory.stat``. Page cache the VMM created by reading the disk image is charged to its cgroup
  but is reclaimable and is not the guest's memory, so it is not billed; active file pages stay
  in. ``memory.stat`` costs ~11 µs a read (10x the others), so it is re-read once a second and
  the last value subtracted in between. Without a memory cgroup: the RSS of the VM's process
  tree (``/proc/<pid>/statm``; pages shared between its processes count once per process).
  Clamped to 0..memory_total_bytes: VMM overhead above the allocation is ours, not billed.
- **Network**: ``/sys/class/net/<host_iface>/statistics/{rx,tx}_bytes`` of the VM's tap/veth.
  The host side sees the VM's traffic mirrored: VM rx = host iface **tx**, VM tx = host rx.
- **Disk**: QEMU ``query-blockstats`` over one persistent QMP connection (rd_bytes/wr_bytes summed
  over devices), or the Firecracker metrics file/FIFO (``block.read_bytes``/``write_bytes``,
  which Firecracker resets at every flush, so they are accumulated here). QMP costs ~0.45 ms a
  call, so disk is read every ``disk_interval_s`` (1 s) and held in between: still cumulative,
  still exact over any window of whole seconds.

Every counter is made cumulative from the instance's boot and never decreasing: a raw counter
that goes down (an interface re-created, a metrics reset) adds the previous value as an offset,
like Prometheus counter resets. When ``MeterTarget.baseline_at_first_read`` is set (the counter
existed before the instance booted, e.g. a reused cgroup), the first read is subtracted.

**A VM that died is not sampled again** (billing stops when it dies, not when metald notices):
each target's process is held by a pidfd, and after every sweep one ``poll`` over all of them
says which exited. The sweep's reading of such a VM is dropped, since it may have been taken
after the death: the series ends at its last reading taken while the process was known alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..core.clock import Clock, SystemClock
from ..core.procs import process_tree
from .codec import NCOLS, Samples
from .model import MeterTarget, SeriesKey

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _open(path: Path | str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _tree_cpu_ns(tree: list[int]) -> int:
    ticks = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/stat", "rb") as fh:
                f = fh.read().rpartition(b")")[2].split()
        except OSError:
            continue
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks * 1_000_000_000 // _CLK_TCK


def _tree_rss(tree: list[int]) -> int:
    pages = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/statm", "rb") as fh:
                pages += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return pages * _PAGE


def _pread_int(fd: int) -> int:
    return int(os.pread(fd, 64, 0))


def _stat_value(fd: int, name: bytes, size: int = 8192) -> int:
    data = os.pread(fd, size, 0)
    for line in data.split(b"\n"):
        k, _, v = line.partition(b" ")
        if k == name:
            return int(v)
    return 0


class QmpBlockstats:
    """A persistent QMP connection answering ``query-blockstats`` (read bytes, written bytes)."""

    def __init__(self, path: Path, timeout_s: float = 1.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        s.connect(str(self.path))
        self._sock, self._buf = s, b""
        self._recv_json()  # greeting
        self._call("qmp_capabilities")
        return s

    def _recv_json(self) -> dict[str, object]:
        while b"\n" not in self._buf:
            if self._sock is None:
                raise ConnectionError("QMP not connected")
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        out = json.loads(line)
        if not isinstance(out, dict):
            raise ConnectionError("QMP sent a non-object")
        return out

    def _call(self, cmd: str) -> object:
        if self._sock is None:
            raise ConnectionError("QMP not connected")
        self._sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
        while True:
            msg = self._recv_json()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise ConnectionError(f"QMP {cmd}: {msg['error']}")
            # asynchronous events interleave with replies; skip them

    def read(self) -> tuple[int, int] | None:
        """(rd_bytes, wr_bytes) summed over block devices; None if QMP is not reachable."""
        try:
            if self._sock is None:
                self._connect()
            devices = self._call("query-blockstats")
        except (OSError, ConnectionError, ValueError):
            self.close()
            return None
        rd = wr = 0
        if isinstance(devices, list):
            for dev in devices:
                stats = dev.get("stats", {}) if isinstance(dev, dict) else {}
                rd += int(stats.get("rd_bytes", 0))
                wr += int(stats.get("wr_bytes", 0))
        return rd, wr

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None


class FirecrackerMetrics:
    """Accumulates block read/write bytes from Firecracker's metrics (one JSON object a line,
    counters reset at each flush). Reads whatever lines are available without blocking."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._partial = b""
        self.read_bytes = 0
        self.write_bytes = 0

    def read(self) -> tuple[int, int]:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return self.read_bytes, self.write_bytes
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if not isinstance(m, dict):
                continue
            for name, sect in m.items():
                # "block" aggregates all drives; per-drive sections repeat it, so prefer it
                wanted = name == "block" or (name.startswith("block_") and "block" not in m)
                if wanted and isinstance(sect, dict):
                    self.read_bytes += int(sect.get("read_bytes", 0))
                    self.write_bytes += int(sect.get("write_bytes", 0))
        return self.read_bytes, self.write_bytes

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class VmReader:
    """The open files of one target and its counter state (offsets, resets, baselines)."""

    def __init__(self, target: MeterTarget) -> None:
        self.target = target
        self.key = target.key
        self._fds: list[int] = []
        # held from the start: a pid reused later cannot be mistaken for the VM
        try:
            self.pidfd: int | None = os.pidfd_open(target.pid)
        except OSError:  # already gone (or no such pid): never sampled
            self.pidfd = None
        else:
            self._fds.append(self.pidfd)
        v2 = target.cgroup_v2_dir
        self._cpu_v2 = self._fd(v2 / "cpu.stat") if v2 else None
        self._cpu_v1 = (
            self._fd(target.cgroup_v1_cpuacct_dir / "cpuacct.usage")
            if target.cgroup_v1_cpuacct_dir and self._cpu_v2 is None
            else None
        )
        # no CPU cgroup: the process tree's times (see the module docstring), held at their
        # highest
        self._tree_cpu = self._cpu_v2 is None and self._cpu_v1 is None
        self._tree_cpu_high = 0
        self._mem: int | None = None
        self._memstat: int | None = None
        self._inactive_name = b"inactive_file"
        if v2 and (v2 / "memory.current").exists():
            self._mem = self._fd(v2 / "memory.current")
            self._memstat = self._fd(v2 / "memory.stat")
        elif target.cgroup_v1_memory_dir:
            self._mem = self._fd(target.cgroup_v1_memory_dir / "memory.usage_in_bytes")
            self._memstat = self._fd(target.cgroup_v1_memory_dir / "memory.stat")
            self._inactive_name = b"total_inactive_file"
        self._tree_mem = self._mem is None
        self._rx = self._tx = None
        if target.host_iface:
            base = Path("/sys/class/net") / target.host_iface / "statistics"
            # VM rx is what the host side transmits, and the other way round.
            self._rx = self._fd(base / "tx_bytes")
            self._tx = self._fd(base / "rx_bytes")
        self._qmp = QmpBlockstats(target.qmp_socket) if target.qmp_socket else None
        self._fc = (
            FirecrackerMetrics(target.firecracker_metrics) if target.firecracker_metrics else None
        )
        self._inactive = 0
        self._disk = (0, 0)
        # counter state, kept here between Collector.set_targets calls (see Collector)
        self.raw_last = np.zeros(NCOLS, dtype=np.int64)
        self.offset = np.zeros(NCOLS, dtype=np.int64)
        self.baseline = np.zeros(NCOLS, dtype=np.int64)
        self.fresh = True

    def _fd(self, path: Path | str) -> int | None:
        fd = _open(path)
        if fd is not None:
            self._fds.append(fd)
        return fd

    def refresh_slow(self) -> None:
        """The expensive readings, once a second: inactive page cache, disk counters."""
        if self._memstat is not None:
            with contextlib.suppress(OSError, ValueError):
                self._inactive = _stat_value(self._memstat, self._inactive_name)
        if self._qmp is not None:
            got = self._qmp.read()
            if got is not None:
                self._disk = got
        if self._fc is not None:
            self._disk = self._fc.read()

    def read_raw(self) -> list[int]:
        """[cpu_ns, mem, rx, tx, rd, wr] as the host reports them now (0 where unknown)."""
        # no cgroup for CPU or for memory: the process tree, walked once for both
        tree = (
            process_tree(self.target.pid)
            if (self._tree_cpu or self._tree_mem) and self.pidfd is not None
            else []
        )
        if self._cpu_v2 is not None:
            cpu = _stat_value(self._cpu_v2, b"usage_usec", 256) * 1000
        elif self._cpu_v1 is not None:
            cpu = _pread_int(self._cpu_v1)
        elif tree:
            cpu = self._tree_cpu_high = max(self._tree_cpu_high, _tree_cpu_ns(tree))
        else:
            cpu = 0
        if self._mem is not None:
            mem = _pread_int(self._mem) - self._inactive
        elif tree:
            mem = _tree_rss(tree)
        else:
            mem = 0
        rx = _pread_int(self._rx) if self._rx is not None else 0
        tx = _pread_int(self._tx) if self._tx is not None else 0
        return [cpu, mem, rx, tx, self._disk[0], self._disk[1]]

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        if self._qmp is not None:
            self._qmp.close()
        if self._fc is not None:
            self._fc.close()


class Collector:
    """Samples every target on each :meth:`sample` call (the caller paces it at 100 ms).

    The counter arithmetic (resets, offsets, baselines, clamping) is done on arrays for all
    targets at once; only the reads are per target."""

    def __init__(self, clock: Clock | None = None, slow_interval_s: float = 1.0) -> None:
        self.clock = clock or SystemClock()
        self.slow_interval_s = slow_interval_s
        self._readers: dict[tuple[str, str], VmReader] = {}
        self._order: list[VmReader] = []
        self._last_slow = -1e18
        self._raw_last = np.zeros((0, NCOLS), dtype=np.int64)
        self._offset = np.zeros((0, NCOLS), dtype=np.int64)
        self._baseline = np.zeros((0, NCOLS), dtype=np.int64)
        self._fresh = np.zeros(0, dtype=bool)
        self._exits = select.poll()  # the pidfds of the targets: readable once it exited
        self._rebuild()

    def _rebuild(self) -> None:
        # save the array state back into the readers, then re-stack it in the new order
        for i, r in enumerate(self._order):
            if i < len(self._raw_last):
                r.raw_last, r.offset, r.baseline = (
                    self._raw_last[i].copy(),
                    self._offset[i].copy(),
                    self._baseline[i].copy(),
                )
                r.fresh = bool(self._fresh[i])
        self._order = list(self._readers.values())
        n = len(self._order)
        self._raw_last = np.array([r.raw_last for r in self._order], dtype=np.int64).reshape(
            n, NCOLS
        )
        self._offset = np.array([r.offset for r in self._order], dtype=np.int64).reshape(n, NCOLS)
        self._baseline = np.array([r.baseline for r in self._order], dtype=np.int64).reshape(
            n, NCOLS
        )
        self._fresh = np.array([r.fresh for r in self._order], dtype=bool)
        self._from_first = np.array(
            [r.target.baseline_at_first_read for r in self._order], dtype=bool
        )
        self._mem_total = np.array([r.key.memory_total_bytes for r in self._order], dtype=np.int64)

    def set_targets(self, targets: Iterable[MeterTarget]) -> list[SeriesKey]:
        """Track exactly ``targets``; returns the keys of series that went away (stopped)."""
        want = {(t.key.vm_id, t.key.instance_id): t for t in targets}
        if want.keys() == self._readers.keys():
            return []
        self._rebuild()  # save state in the current order first
        gone = []
        for k in list(self._readers):
            if k not in want:
                r = self._readers.pop(k)
                if r.pidfd is not None:
                    self._exits.unregister(r.pidfd)
                r.close()
                gone.append(r.key)
        for k, t in want.items():
            if k not in self._readers:
                r = VmReader(t)
                if r.pidfd is not None:
                    self._exits.register(r.pidfd, select.POLLIN)
                r.refresh_slow()
                self._readers[k] = r
        self._rebuild()
        return gone

    @property
    def keys(self) -> list[SeriesKey]:
        return [r.key for r in self._order]

    def sample(self) -> tuple[list[SeriesKey], Samples]:
        """One reading of every target: (keys, rows), rows in codec column order, counters
        cumulative since boot and never decreasing, memory within 0..allocation."""
        now = self.clock.monotonic()
        if now - self._last_slow >= self.slow_interval_s:
            self._last_slow = now
            for r in self._order:
                r.refresh_slow()
        time_ns = self.clock.time_ns
        vals: list[list[int]] = []
        ok: list[bool] = []
        for r in self._order:
            try:
                v = r.read_raw()
            except (OSError, ValueError):
                v = [0] * (NCOLS - 1)  # the VM is going away; set_targets will retire it
                ok.append(False)
            else:
                ok.append(True)
            v.insert(0, time_ns())
            vals.append(v)
        if self._order:  # after the readings: a VM alive now was alive when it was read
            exited = {fd for fd, _ev in self._exits.poll(0)}
            for i, r in enumerate(self._order):
                if r.pidfd is None or r.pidfd in exited:
                    ok[i] = False
        n = len(vals)
        raw = np.array(vals, dtype=np.int64).reshape(n, NCOLS)
        good = np.array(ok, dtype=bool)
        raw[~good] = self._raw_last[~good]
        first = self._fresh & good
        if first.any():
            self._baseline[first] = np.where(self._from_first[first, None], raw[first], 0)
            self._baseline[:, 0] = 0
            self._baseline[:, 2] = 0
            self._raw_last[first] = raw[first]
            self._fresh[first] = False
        reset = raw < self._raw_last
        reset[:, 0] = False
        reset[:, 2] = False
        self._offset += np.where(reset, self._raw_last, 0)
        self._raw_last = raw
        out = raw + self._offset - self._baseline
        out[:, 2] = np.clip(raw[:, 2], 0, self._mem_total)
        keys = [r.key for r, g in zip(self._order, ok, strict=True) if g]
        return keys, out[good]

    def close(self) -> None:
        for r in self._order:
            if r.pidfd is not None:
                self._exits.unregister(r.pidfd)
            r.close()
        self._readers.clear()
        self._order = []
        self._rebuild()


def sweep_cost(collector: Collector, sweeps: int, interval_s: float = 0.1) -> float:
    """CPU seconds per wall second spent by ``sweeps`` paced sweeps (for bench/metering.py)."""
    start_cpu = time.process_time()
    start = time.monotonic()
    for i in range(sweeps):
        collector.sample()
        delay = start + (i + 1) * interval_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return (time.process_time() - start_cpu) / max(time.monotonic() - start, 1e-9)
