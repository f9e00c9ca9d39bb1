"""One cgroup per VM: CPU quota = vcpus, memory limit = memory (+ VMM overhead).

Works on cgroup v1 (one directory per controller: cpu, cpuacct, memory, pids), on pure cgroup v2,
and on the hybrid layout of our CI machines (v1 controllers + an almost empty v2 hierarchy at
``/sys/fs/cgroup/unified``). Directories are created *below the cgroup metald itself runs in*
for each controller (``<mount>/<own path>/unkey-metald/<vm_id>``), because on hosts like ours a
process may only create memory cgroups inside its own subtree.

metald writes the VM process's pid to ``cgroup.procs`` *before* it execs the VMM (see
``drivers.base.Launcher``), so every child the VMM forks is accounted too.

Joining is slow by default: a move between cgroups takes the kernel's global
``cgroup_threadgroup_rwsem`` for writing, and after an idle spell that first waits for an RCU
grace period (~8-11 ms on our machines: as long as a whole sandbox app start). The kernel's
``favordynmods`` cgroup option (Linux >= 6.0) trades that for slightly dearer forks and exits;
:func:`favor_dynmods` turns it on for the host (metald does at start unless
``metald.cgroup_favordynmods`` is false); :meth:`CgroupManager.prime` hides part of the wait
where it is off.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import VmError
from . import linux

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
_PERIOD_US = 100_000


def _own_paths() -> dict[str, str]:
    """controller name -> our cgroup path, from /proc/self/cgroup (``""`` is the v2 entry)."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def _is_pure_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def _own_dirs() -> tuple[Path | None, dict[str, Path]]:
    """The cgroup directories this process is in: the v2 one on a pure v2 host, else one per
    mounted v1 controller of :data:`V1_CONTROLLERS` (in that order)."""
    own = _own_paths()
    if _is_pure_v2():
        return CGROUP_ROOT / own.get("", "/").lstrip("/"), {}
    return None, {
        ctrl: CGROUP_ROOT / ctrl / own.get(ctrl, "/").lstrip("/")
        for ctrl in V1_CONTROLLERS
        if (CGROUP_ROOT / ctrl / "cgroup.procs").exists()
    }


def _cgroup_mounts() -> list[tuple[str, str, list[str]]]:
    """(fstype, mount point, super options) of each cgroup mount, from /proc/self/mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _source, opts = [*post.split(), "", "", ""][:3]
        if fstype in ("cgroup", "cgroup2"):
            out.append((fstype, pre.split()[4], opts.split(",")))
    return out


def favordynmods_on() -> bool:
    """Whether a mounted cgroup hierarchy shows ``favordynmods`` (the option is host-wide in
    effect: it switches the one global lock every join takes)."""
    return any("favordynmods" in opts for _, _, opts in _cgroup_mounts())


def set_cgroup2_root_option(option: str, on: bool) -> None:
    """Set or clear one flag of the cgroup2 root (e.g. ``favordynmods``), keeping the others.

    The root always exists and takes its flags from the options of any new mount of it: a
    throw-away mount with the root's current options (read from the visible cgroup2 mount) with
    ``option`` added or removed, unmounted at once, changes that flag and nothing else. Root and
    the host's cgroup namespace only. Raises OSError (EINVAL: the kernel has no such option;
    ENOENT: no visible cgroup2 mount, so the current options cannot be known)."""
    v2 = [opts for fstype, _, opts in _cgroup_mounts() if fstype == "cgroup2"]
    if not v2:
        raise OSError(errno.ENOENT, "no cgroup2 mount to read the root's options from")
    opts = [o for o in v2[0] if o not in ("rw", "ro", "", option)] + ([option] if on else [])
    target = tempfile.mkdtemp(prefix="unkey-cgroup2-")
    try:
        flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
        linux.mount("cgroup2", target, "cgroup2", flags, ",".join(opts))
        linux.umount(target, linux.MNT_DETACH)
    finally:
        with contextlib.suppress(OSError):
            Path(target).rmdir()


def favor_dynmods() -> str:
    """Turn on the kernel's ``favordynmods`` for this host, so a VM's cgroup join costs ~0.1 ms
    instead of an RCU grace period (see the module docstring). Returns what is in effect, for
    metald's status: ``"on"`` (already), ``"on (set by metald)"``, or ``"off: <why>"``.
    The flag is the cgroup2 root's (:func:`set_cgroup2_root_option`); without a visible cgroup2
    mount nothing is changed (boot with ``cgroup_favordynmods=true`` there)."""
    if favordynmods_on():
        return "on"
    if os.geteuid() != 0:
        return "off: needs root"
    try:
        set_cgroup2_root_option("favordynmods", True)
    except OSError as exc:  # EINVAL: a kernel < 6.0
        return f"off: {exc}"
    if favordynmods_on():
        return "on (set by metald)"
    return "off: the kernel kept the option off (a cgroup namespace other than the host's?)"


@dataclass(frozen=True)
class VmCgroup:
    """The cgroup directories of one VM (absent controllers are None)."""

    name: str
    v2: Path | None = None
    v1: dict[str, Path] = field(default_factory=dict)

    @property
    def cpuacct_dir(self) -> Path | None:
        return self.v1.get("cpuacct")

    @property
    def memory_dir(self) -> Path | None:
        return self.v1.get("memory")

    def dirs(self) -> list[Path]:
        return ([self.v2] if self.v2 else []) + list(self.v1.values())

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs()]

    def pids(self) -> list[int]:
        seen: set[int] = set()
        for f in self.procs_files():
            with contextlib.suppress(OSError):
                seen.update(int(x) for x in f.read_text().split())
        return sorted(seen)

    def cpu_time_ns(self) -> int:
        if self.cpuacct_dir:
            return int((self.cpuacct_dir / "cpuacct.usage").read_text())
        if self.v2:
            for line in (self.v2 / "cpu.stat").read_text().splitlines():
                k, v = line.split()
                if k == "usage_usec":
                    return int(v) * 1000
        return 0

    def memory_bytes(self) -> int:
        if self.memory_dir:
            return int((self.memory_dir / "memory.usage_in_bytes").read_text())
        if self.v2 and (self.v2 / "memory.current").exists():
            return int((self.v2 / "memory.current").read_text())
        return 0

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left inside and remove every directory (idempotent)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.pids()
            if not left:
                break
            self.kill_all()
            if time.monotonic() > deadline:
                raise VmError(f"cgroup {self.name} still has processes {left} after SIGKILL")
            time.sleep(0.01)
        for d in self.dirs():
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    # EBUSY for a moment after the last task exits
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)

    def exists(self) -> bool:
        return any(d.exists() for d in self.dirs())


class CgroupManager:
    """Creates per-VM cgroups below ``<own cgroup>/<parent_name>`` on each controller."""

    def __init__(self, parent_name: str = "unkey-metald") -> None:
        self.parent_name = parent_name
        self.available = os.geteuid() == 0 and CGROUP_ROOT.is_dir()
        self._priming = threading.Lock()
        # what favor_dynmods() found or did ("on...", "off: ..."); joins need no prime when on
        self.favordynmods = "not requested (metald.cgroup_favordynmods = false)"

    def favor_dynmods(self) -> str:
        """:func:`favor_dynmods` for this host (once, at metald's start); remembered for status."""
        self.favordynmods = favor_dynmods() if self.available else "off: cgroups not managed here"
        return self.favordynmods

    def prime(self) -> None:
        """Start, in the background, the wait that the next cgroup join would pay on the boot path.

        Moving a task between cgroups takes the kernel's global ``cgroup_threadgroup_rwsem`` for
        writing; after an idle spell that first waits for an RCU grace period (~6-10 ms here),
        joins soon after are fast. A VM's start-up chain joins its new cgroup first thing, so
        each boot paid that wait before its app could start. Called once the VM's cgroup is made
        (the wait holds cgroup_mutex: a mkdir would queue behind it), before the rest: a
        no-op migration (our own pid into the cgroup we are in) pays it meanwhile, so the
        join a few ms later finds the lock warm. Best effort: a failure changes nothing.
        Not needed (nothing done) once ``favordynmods`` is on: then joins never wait."""
        if self.favordynmods.startswith("on"):
            return
        if not self.available or not self._priming.acquire(blocking=False):
            return  # one at a time: a prime in flight warms the lock for every boot
        threading.Thread(target=self._prime, name="cgroup-prime", daemon=True).start()

    def _prime(self) -> None:
        try:
            v2, v1 = _own_dirs()
            own = v2 if v2 is not None else next(iter(v1.values()), None)
            if own is not None:
                with contextlib.suppress(OSError):
                    (own / "cgroup.procs").write_text(str(os.getpid()))
        finally:
            self._priming.release()

    def paths_for(self, name: str) -> VmCgroup:
        """The directories ``name`` would have, without creating anything."""
        v2, own = _own_dirs()
        if v2 is not None:
            return VmCgroup(name, v2=v2 / self.parent_name / name)
        v1 = {ctrl: d / self.parent_name / name for ctrl, d in own.items()}
        return VmCgroup(name, v1=v1)

    def create(self, name: str, *, vcpus: int, memory_limit_bytes: int) -> VmCgroup | None:
        """Create the VM's cgroup with its limits; None when cgroups cannot be managed here."""
        if not self.available:
            return None
        cg = self.paths_for(name)
        try:
            if cg.v2 is not None:
                base = cg.v2.parent
                base.mkdir(parents=True, exist_ok=True)
                for d in (base.parent, base):
                    with contextlib.suppress(OSError):
                        (d / "cgroup.subtree_control").write_text("+cpu +memory +pids")
                cg.v2.mkdir(exist_ok=True)
                (cg.v2 / "cpu.max").write_text(f"{vcpus * _PERIOD_US} {_PERIOD_US}")
                if (cg.v2 / "memory.max").exists():
                    (cg.v2 / "memory.max").write_text(str(memory_limit_bytes))
            for ctrl, d in cg.v1.items():
                d.mkdir(parents=True, exist_ok=True)
                if ctrl == "cpu":
                    (d / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
                    (d / "cpu.cfs_quota_us").write_text(str(vcpus * _PERIOD_US))
                elif ctrl == "memory":
                    (d / "memory.limit_in_bytes").write_text(str(memory_limit_bytes))
        except OSError as exc:
            with contextlib.suppress(OSError, VmError):
                cg.remove(timeout=1)
            raise VmError(f"cannot set up cgroup {name}: {exc}") from exc
        return cg
