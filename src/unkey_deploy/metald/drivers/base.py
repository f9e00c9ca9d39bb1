"""The VM driver seam: what metald asks of a VMM, and what it keeps to find the VM again.

A driver turns a :class:`VmSpec` (everything already prepared by metald: the jail directory with
the rootfs copy and kernel, the cgroup, the network attachment) into a running process, and can
stop, inspect, measure and re-attach to it. Drivers hold no state of their own between calls:
everything needed later is in the :class:`VmRuntime` they return, which metald persists, so a
restarted metald can :meth:`VmDriver.recover` its VMs.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ...core.errors import VmError
from ...core.ids import CustomerId, InstanceId, VmId
from ..cgroups import VmCgroup
from ..kernel import KernelPaths

DriverName = Literal["qemu", "firecracker", "sandbox"]


# a VM's console log, in its jail (the VMM's serial console, the sandbox's output)
CONSOLE_LOG = "console.log"


@dataclass(frozen=True)
class NetAttachment:
    """How the VM reaches the world and how the host reaches the app.

    ``mode``:
      * ``tap``: a tap device ``host_iface`` (host side ``host_ip``), guest has ``guest_ip``
        on a point-to-point /30 (qemu, firecracker; root only);
      * ``netns``: a network namespace ``netns`` joined to the host by a veth pair whose host end
        is ``host_iface`` (sandbox; root only);
      * ``user``: QEMU user-mode networking, the app port forwarded from 127.0.0.1:``host_port``;
      * ``host``: the host's own network (sandbox without root); the app listens on its port.
    """

    mode: Literal["tap", "netns", "user", "host"]
    host_iface: str | None = None
    netns: str | None = None
    host_ip: str | None = None
    guest_ip: str | None = None
    prefix: int = 30
    host_port: int | None = None
    mac: str | None = None

    def endpoint(self, port: int) -> tuple[str, int]:
        """(address, port) at which the host reaches the app's ``port``."""
        if self.mode in ("tap", "netns"):
            if self.guest_ip is None:
                raise VmError(f"{self.mode} network attachment without a guest address")
            return self.guest_ip, port
        if self.mode == "user":
            if self.host_port is None:
                raise VmError("user-mode network attachment without a forwarded port")
            return "127.0.0.1", self.host_port
        return "127.0.0.1", port


@dataclass(frozen=True)
class VmSpec:
    """Everything a driver needs to boot one instance of one VM."""

    vm_id: VmId
    instance_id: InstanceId
    customer_id: CustomerId
    vcpus: int
    memory_bytes: int
    port: int
    workdir: Path  # the jail directory (chroot for the VMM)
    rootfs: Path  # the per-VM copy inside workdir
    net: NetAttachment
    kernel: KernelPaths | None = None
    cgroup: VmCgroup | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # unprivileged uid/gid the VMM runs as when metald is root (None: keep ours)
    run_as: tuple[int, int] | None = None
    # name servers for the guest's /etc/resolv.conf (empty: the image's own is left alone)
    dns: tuple[str, ...] = ()
    # the VM's process made ahead of the boot (a pooled sandbox spare's), for the driver to run
    # its command in instead of starting one; the driver discards what it does not use
    launcher: Launcher | None = field(default=None, compare=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / CONSOLE_LOG


@dataclass
class VmRuntime:
    """What a driver needs to find a booted VM again (persisted as JSON by metald)."""

    driver: str
    pid: int
    pid_start: int  # /proc/<pid>/stat starttime: guards against pid reuse after a restart
    workdir: str
    log_path: str
    qmp_socket: str | None = None
    api_socket: str | None = None
    metrics_path: str | None = None
    mounts: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VmRuntime:
        return cls(**dict(data))


@dataclass(frozen=True)
class VmStats:
    """Cumulative counters of one instance (host-side view)."""

    cpu_time_ns: int
    memory_used_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int


@dataclass(frozen=True)
class DriverCapabilities:
    """What a driver can do on this host; reported by ``capabilities/status``."""

    name: str
    available: bool
    reason: str
    accel: str | None = None  # qemu: "kvm" or "tcg"
    isolation: str = "vm"  # "vm" (hardware virtualisation or emulation) or "namespaces"
    networking: tuple[str, ...] = ()
    graceful_stop: bool = True
    block_stats: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class VmDriver(Protocol):
    """A VMM backend. Every method may raise :class:`unkey_deploy.core.errors.VmError`."""

    name: str

    def capabilities(self) -> DriverCapabilities:
        """Whether this driver works on this host (cheap; results of trials are cached)."""
        ...

    def create(self, spec: VmSpec) -> None:
        """Driver-specific preparation inside ``spec.workdir`` (config files, sockets dirs)."""
        ...

    def boot(self, spec: VmSpec) -> VmRuntime:
        """Start the VMM; return as soon as it runs (readiness is checked by metald over HTTP)."""
        ...

    def stop(self, runtime: VmRuntime, timeout: float) -> None:
        """Ask the guest to shut down, wait up to ``timeout``, then kill. Idempotent."""
        ...

    def delete(self, runtime: VmRuntime) -> None:
        """Release what ``boot`` acquired beyond the process (mounts, sockets). Idempotent."""
        ...

    def remove_leftovers(self, vm_id: str) -> None:
        """Release what ``boot`` acquired outside the VM's jail when no runtime of it was
        recorded (a boot cut short by a crash), found by the VM's id. Idempotent."""
        ...

    def inspect(self, runtime: VmRuntime) -> bool:
        """True while the VM's process is alive (and is the same process)."""
        ...

    def stats(self, runtime: VmRuntime, spec: VmSpec) -> VmStats:
        """Current cumulative counters."""
        ...

    def recover(self, runtime: VmRuntime) -> bool:
        """Re-attach after a metald restart: True when the VM still runs and is usable."""
        ...


def pid_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in ticks), or None when the pid is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces/parentheses: split after the last ')'
    fields = data[data.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def process_alive(pid: int, start: int) -> bool:
    return pid > 0 and pid_start_time(pid) == start


def reap(pid: int, wait: float = 0.0) -> None:
    """Collect our child's exit status if it is ours (no zombie left behind); with ``wait``,
    keep trying that long for a child that is exiting right now."""
    deadline = time.monotonic() + wait
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            return  # not our child (metald restarted) or already collected
        if done == pid or time.monotonic() >= deadline:
            return
        time.sleep(0.002)


def wait_exit(pid: int, start: int, timeout: float, *, poll: float = 0.01) -> bool:
    """Wait up to ``timeout`` s for our child ``pid`` (started at ``start``) to exit, reaping
    it; True when it is gone."""
    deadline = time.monotonic() + timeout
    while process_alive(pid, start):
        reap(pid)
        if time.monotonic() >= deadline:
            return not process_alive(pid, start)
        time.sleep(poll)
    reap(pid)
    return True


def kill_process(pid: int, start: int) -> None:
    """SIGKILL ``pid`` if it is still the process started at ``start`` (never a recycled pid),
    wait for it to die and reap it (no zombie left behind)."""
    if process_alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_exit(pid, start, 5.0, poll=0.005)
    reap(pid, wait=2.0)


class Launcher:
    """A VM's process started ahead of its command line: ``prefix`` (what puts it in its
    namespaces as its user, e.g. ``nsenter``), then a shell that waits on its stdin for the one
    command it will ``exec``. The process is in its own session, with stdout/stderr appended to
    ``log`` and no pipe back to metald once it runs. :meth:`run` moves it into the VM's cgroup
    (from metald: nothing has forked yet) and hands it the command.

    :func:`spawn` is a launcher used at once. Made ahead of a boot (``NetnsPool``), it takes
    starting the prefix and the shell (two programs, ~1.5 ms) off the boot path. An unused one
    exits on its own when metald goes (end of its stdin) or is :meth:`discard` ed."""

    def __init__(self, prefix: Sequence[str], *, log: Path, cwd: Path | str = "/") -> None:
        self.log = Path(log)
        with open(self.log, "ab") as out:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [*prefix, "/bin/sh", "-s"],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        self.pid = self._proc.pid

    def alive(self) -> bool:
        """Whether it still waits for its command."""
        return self._proc is not None and self._proc.poll() is None

    def adopt_log(self, path: Path) -> None:
        """Make ``path`` the log (a rename of the file its output goes to: same file system)."""
        self.log.replace(path)
        self.log = Path(path)

    def run(self, argv: Sequence[str], *, cgroup: VmCgroup | None, supervise: bool = False) -> int:
        """Join ``cgroup`` and exec ``argv`` (stdin: /dev/null); returns the pid. With
        ``supervise`` the shell runs ``argv`` as its child instead and waits for it, exiting
        with its status: a parent for a command that must die with its parent (bwrap
        ``--die-with-parent``) but outlive metald."""
        proc, self._proc = self._proc, None
        if proc is None:
            raise VmError(f"launcher {self.pid} was used already")
        if proc.stdin is None:  # (always a pipe: made so in __init__)
            raise VmError(f"launcher {self.pid} has no input")
        try:
            if cgroup is not None:
                for f in cgroup.procs_files():
                    f.write_text(str(self.pid))
            how = "" if supervise else "exec "
            proc.stdin.write(f"{how}{shlex.join(argv)} </dev/null\n".encode())
            proc.stdin.close()
        except OSError as exc:  # it died (its prefix failed), or the cgroup is gone
            _end(proc)
            raise VmError(f"cannot start {argv[0]}: {exc}; see {self.log}") from exc
        # Popen's handle is dropped on purpose: metald reaps with waitpid (reap()) and survives
        # its own restarts, so the process must not depend on this object.
        proc.returncode = 0  # silence the "still running" ResourceWarning when it is freed
        return self.pid

    def discard(self) -> None:
        """End an unused launcher (idempotent; a used one is its VM's process: left alone)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _end(proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()  # a waiting shell exits at the end of its input
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def spawn(argv: list[str], *, cgroup: VmCgroup | None, log: Path, cwd: Path) -> int:
    """Start ``argv`` in its own session (it outlives metald), inside ``cgroup`` from its first
    instruction, with stdout/stderr appended to ``log``; returns the pid."""
    return Launcher([], log=log, cwd=cwd).run(argv, cgroup=cgroup)
