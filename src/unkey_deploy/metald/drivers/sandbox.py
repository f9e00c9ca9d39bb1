"""The ``sandbox`` driver: bubblewrap namespaces + cgroup limits on the same rootfs, no VMM.

For hosts without a usable VMM. Isolation is by Linux namespaces, not hardware virtualisation,
so this is weaker than ``qemu``/``firecracker`` and is reported as ``isolation="namespaces"``.

* Root file system: as root, the VM's ext4 image is loop-mounted read-only once per host
  (``<run_dir>/images/<id>``, shared by every VM of that image: its pages are cached once; kept
  ``image_keep_s`` after its last VM goes, so the next VM of it finds it mounted and cached,
  then unmounted, and unused ones when metald stops) and an overlay with a per-VM writable
  upper directory goes on top (copy-on-write, nothing copied). The upper directory is on a
  tmpfs of the VM's own, as is its /tmp: what the app writes is bounded (``writable_bytes``)
  and is memory charged to its cgroup, never a host's disk. Without root, the
  tree is extracted with ``debugfs -R "rdump / <dir>"`` (no mount needed).
* Users: as root (where a trial shows it works: ``maps_ids``), each sandbox has a user
  namespace whose ids 0..65535 are a range of host ids of its own (``uid_base``: its address
  slot's, in systemd's range for containers), and sees
  the image through an idmapped copy of its shared mount: the sandbox's users own what the
  image gives them and the image's ``User`` is switched to, as in a VM. Its root keeps
  ``CAPS`` inside its namespaces (no mount), and is an unprivileged uid on the host.
  Otherwise bwrap maps its one user (``run_as``) to root, with no capability (the app then
  writes only where the image lets anyone).
* Processes: ``bwrap`` with new pid, ipc, uts and cgroup namespaces, a fresh /proc, /dev
  and /tmp, started as the sandbox's unprivileged host uid (``nsenter -S/-G`` into the VM's
  network namespace, then ``unshare --user``; ``setpriv`` and bwrap's own user namespace on
  the host network), so even "root" in the sandbox has no capability on the host. The VM's
  process (the pid metald records) is a ``drivers.base.Launcher``'s
  shell, bwrap its child: on a pooled spare (metald's ``NetnsPool``) it was started ahead of
  the boot and waits in the namespace, so the boot only hands it the bwrap command line. bwrap
  runs with ``--die-with-parent``: killing the shell or bwrap takes the whole sandbox down at
  once (as killing a VMM does its VM), and the shell outlives metald, so the VM does too.
  ``--as-pid-1``: the image's init is PID 1 of its namespace,
  as in a VM, and reaps its children itself (bwrap's own reaper would be orphaned when bwrap
  exits, and on hosts whose PID 1 does not reap, like our CI machines, leak as a zombie).
  As root, each VM gets its own network namespace joined to the
  host by a veth pair (metald's network module creates it); without root the sandbox shares
  the host network and the app's port must be free.
* Limits: the cgroup (CPU quota = vcpus, memory) is joined (by metald) before bwrap starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ...core.errors import VmError
from ...core.log import event
from ...core.log import get as get_logger
from ...core.procs import children, process_tree
from .. import linux
from ..jail import merge_env_tree, write_resolv_tree
from .base import (
    DriverCapabilities,
    Launcher,
    NetAttachment,
    VmRuntime,
    VmSpec,
    VmStats,
    pid_start_time,
    process_alive,
    reap,
    wait_exit,
)

_log = get_logger("metald.sandbox")
BWRAP = "bwrap"
# Root hosts: each sandbox's users 0..65535 are a range of host uids (and gids) of its own, in
# systemd's range for containers (524288..1879048191, docs UIDS-GIDS): the range of the VM's
# address (its /30: no two VMs of a host share one while the host's subnet is at most a /16,
# the 2^14 ranges that fit in systemd's; two metalds on one host with subnets whose addresses
# agree in their low 16 bits would reuse ranges).
UID_BASE = 0x80000
UID_RANGE = 65536
_SLOTS = 1 << 14  # ranges up to UID_BASE + 2^30, inside systemd's
# The capabilities a mapped sandbox's root keeps inside its namespaces (a container runtime's
# usual set, less NET_RAW, MKNOD, AUDIT_WRITE and SETFCAP): enough for an image's init to
# switch to its user and for root's usual file work; no mount, no raw sockets. They are
# capabilities in the sandbox's own user namespace, never on the host. (Its bounding set stays
# whole, which bwrap does not narrow here: an image's file capabilities work as in a VM, inside
# the sandbox's namespaces only.)
CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
        "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT")  # fmt: skip
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-400:]}")


def _mount_points(tree: Path) -> None:
    """Create the directories bwrap mounts over (/proc, /dev, /tmp) when the image has none:
    bwrap runs unprivileged and could not create them in a root-owned tree."""
    for d in ("proc", "dev", "tmp"):
        (tree / d).mkdir(exist_ok=True)


def _overlays() -> Iterator[tuple[str, list[str]]]:
    """The overlays mounted on the host: (mount point, lower layers)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            f = line.split()
            if len(f) >= 4 and f[2] == "overlay":
                for opt in f[3].split(","):
                    if opt.startswith("lowerdir="):
                        yield f[1], opt[9:].split(":")


def _overlays_on(lower: Path) -> list[str]:
    """Mount points of the overlays whose lower layer is ``lower``."""
    return [at for at, lowers in _overlays() if str(lower) in lowers]


def _copies_of(mount: Path) -> list[str]:
    """The other mounts of the file system mounted at ``mount`` (a sandbox's idmapped copy of
    its image's mount)."""
    try:
        dev = mount.stat().st_dev
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    want = f"{os.major(dev)}:{os.minor(dev)}"
    return [f[4] for f in (line.split() for line in lines) if f[2] == want and f[4] != str(mount)]


def is_mounted(path: Path) -> bool:
    """Whether a file system is mounted at ``path`` (the image and overlay mounts, each its own
    device: two stats, where reading /proc/self/mounts costs ~0.1 ms on a busy host)."""
    return os.path.ismount(path)


def _caps_args() -> list[str]:
    args = ["--cap-drop", "ALL"]
    for cap in CAPS:
        args += ["--cap-add", cap]
    return args


def uid_base(net: NetAttachment) -> int | None:
    """The first host uid (and gid) of the sandbox's own range on ``net`` (a VM link of a root
    host), None elsewhere (then its one user is the driver's ``run_as``)."""
    if net.mode != "netns" or not net.guest_ip:
        return None
    slot = (int(ipaddress.IPv4Address(net.guest_ip)) >> 2) % _SLOTS
    return UID_BASE + slot * UID_RANGE


def _map_ids(pid: int, base: int, timeout: float = 5.0) -> None:
    """Give the user namespace that ``pid`` made (``unshare --user``) its ids: 0..65535 inside
    are ``base``.. on the host. Waits for the namespace (the program chain starting ``pid``
    has to reach ``unshare``); metald writes the maps, as root of the host's namespace."""
    own = Path("/proc/self/ns/user").stat().st_ino
    deadline = time.monotonic() + timeout
    while True:
        try:
            if Path(f"/proc/{pid}/ns/user").stat().st_ino != own:
                break
        except FileNotFoundError:
            raise VmError(f"the sandbox's process {pid} exited before its user namespace") from None
        if time.monotonic() > deadline:
            raise VmError(f"the sandbox's process {pid} made no user namespace in {timeout} s")
        time.sleep(0.0002)
    for kind in ("uid", "gid"):
        Path(f"/proc/{pid}/{kind}_map").write_text(f"0 {base} {UID_RANGE}\n")


def writable_bytes(memory_bytes: int) -> int:
    """The most a sandbox may write to its root file system, and as much again to its /tmp:
    half its memory each, the default size of a tmpfs in a VM of that memory (a VM's image has
    no room to spare: the builder shrinks it; its /tmp is a tmpfs in its RAM). Both are tmpfs,
    charged to the VM's memory cgroup: an app writing more gets ENOSPC, never a host's disk."""
    page = 4096
    return max(memory_bytes // 2 // page, 1) * page


class SandboxDriver:
    """bubblewrap + cgroups; see the module docstring."""

    name = "sandbox"

    def __init__(
        self, *, run_as: tuple[int, int] = (65534, 65534), run_dir: Path | None = None
    ) -> None:
        self.run_as = run_as
        self.root = os.geteuid() == 0
        # seconds an image stays mounted after its last VM (metald sets metald.image_keep_s)
        self.image_keep_s = 0.0
        # Mount points live under a root-owned, world-traversable directory: the unprivileged
        # bwrap must be able to reach the tree, whatever the permissions of metald's state dir.
        self.run_dir = run_dir or Path("/run/unkey-metald")
        self._unmapped_said = False  # (see _seen_by)

    def capabilities(self) -> DriverCapabilities:
        nets = ("netns",) if self.root else ("host",)
        if shutil.which(BWRAP) is None:
            return DriverCapabilities(self.name, False, "bwrap not found", isolation="namespaces")
        if not self.root and shutil.which("debugfs") is None:
            return DriverCapabilities(
                self.name, False, "debugfs (e2fsprogs) not found", isolation="namespaces"
            )
        probe = subprocess.run(
            [
                BWRAP,
                "--unshare-user",
                "--unshare-pid",
                "--as-pid-1",
                "--ro-bind",
                "/",
                "/",
                "/bin/true",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode != 0:
            return DriverCapabilities(
                self.name, False, f"bwrap trial failed: {probe.stderr.strip()[:200]}",
                isolation="namespaces",
            )  # fmt: skip
        reason = "bwrap trial run succeeded"
        if self.root:
            why = self._ids_trial
            reason += ("; each sandbox gets its own range of host ids" if why is None else
                       f"; each sandbox runs as one host id (no id ranges: {why})")  # fmt: skip
        return DriverCapabilities(
            self.name, True, reason, isolation="namespaces", networking=nets, graceful_stop=True,
        )  # fmt: skip

    def maps_ids(self) -> bool:
        """Whether sandboxes get a range of host ids of their own here: root, and a trial of
        it worked (an unprivileged user namespace, mapped by metald, with bwrap as its root:
        a host may forbid unprivileged user namespaces, or deny them capabilities)."""
        return self.root and self._ids_trial is None

    @functools.cached_property
    def _ids_trial(self) -> str | None:
        """Run the mapped chain once (cached); None when it works, else why not (logged)."""
        base = UID_BASE + (_SLOTS - 1) * UID_RANGE
        why: str | None = None
        with tempfile.TemporaryDirectory(prefix="unkey-sandbox-trial-") as d:
            log = Path(d) / "trial.log"
            prefix = ["setpriv", f"--reuid={base}", f"--regid={base}", "--clear-groups", "--",
                      "unshare", "--user", "--"]  # fmt: skip
            try:
                launcher = Launcher(prefix, log=log)
                try:
                    _map_ids(launcher.pid, base)
                except (OSError, VmError):
                    launcher.discard()
                    raise
                pid = launcher.run([BWRAP, *_caps_args(), "--unshare-pid", "--as-pid-1",
                                    "--ro-bind", "/", "/", "/bin/true"], cgroup=None)  # fmt: skip
                status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                if status != 0:
                    why = f"exit status {status}: {log.read_text(errors='replace')[-200:]}"
            except (OSError, VmError) as exc:
                why = str(exc)
        if why is not None:
            event(_log, "sandboxes run as one host id", logging.WARNING, error=why)
        return why

    # -- lifecycle ----------------------------------------------------------------------------
    def create(self, spec: VmSpec) -> None:
        spec.workdir.mkdir(parents=True, exist_ok=True)

    def _tree_dir(self, spec: VmSpec, launcher: Launcher) -> tuple[Path, list[str], Path | None]:
        """Make the VM's root tree available; returns it, the mounts made for this VM only
        (innermost last) and the shared image mount it stands on (root only). Mapped (see
        :meth:`mapped`): the image's files are seen through ``launcher``'s user namespace
        (an idmapped copy of the image's mount), so the sandbox's users own what they own in
        the image."""
        base = self.base_dir(spec.vm_id) if self.root else spec.workdir
        base.mkdir(parents=True, exist_ok=True, mode=0o755)
        merged = base / "root"
        if not self.root:
            merged.mkdir(exist_ok=True)
            if not (merged / ".vminit").exists():
                _run(["debugfs", "-R", f"rdump / {merged}", str(spec.rootfs)])
            merge_env_tree(merged, dict(spec.env))
            write_resolv_tree(merged, list(spec.dns))
            _mount_points(merged)
            return merged, [], None
        mounts: list[str] = []
        lower: Path | None = None
        try:
            # the VM's writes (its upper layer) go to a tmpfs of its own: bounded, in memory
            # charged to the VM's cgroup, gone at its deletion (see writable_bytes)
            if not is_mounted(base):
                try:
                    linux.mount("tmpfs", str(base), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                                f"size={writable_bytes(spec.memory_bytes)},mode=0755")  # fmt: skip
                except OSError as exc:
                    raise VmError(f"cannot mount the VM's tmpfs at {base}: {exc}") from exc
            mounts.append(str(base))
            upper, work, seen = base / "upper", base / "work", base / "lower"
            for d in (upper, work, merged, seen):
                d.mkdir(exist_ok=True)
            ids = self._ids_for(spec.net, spec.run_as)
            if ids is not None:
                os.chown(upper, ids, ids)  # the tree's / (the upper layer's root) is its root's
            # under the images lock: a shared image mount is only ever unmounted when no
            # overlay or copy of it is on it, checked under the same lock (see _release_image)
            with self._images_lock():
                lower = self._image(spec.rootfs)
                layer = lower
                if ids is not None:
                    layer = self._seen_by(launcher, lower, seen)
                    if layer == seen:
                        mounts.append(str(seen))
                if not is_mounted(merged):
                    opts = f"lowerdir={layer},upperdir={upper},workdir={work}"
                    try:
                        linux.mount("overlay", str(merged), "overlay", 0, opts)
                    except OSError as exc:
                        raise VmError(f"cannot mount the overlay at {merged}: {exc}") from exc
            mounts.append(str(merged))
            merge_env_tree(merged, dict(spec.env))  # lands in the per-VM upper layer
            write_resolv_tree(merged, list(spec.dns))  # so does this
            if ids is not None:  # written by metald: made the sandbox root's, as in the image
                for f in (merged / ".vminit" / "env", merged / "etc" / "resolv.conf"):
                    with contextlib.suppress(FileNotFoundError):
                        os.chown(f, ids, ids, follow_symlinks=False)
            _mount_points(merged)
        except (VmError, OSError):
            self._unmount(mounts)
            if lower is not None:
                self._release_image(lower)
            raise
        return merged, mounts, lower

    def _seen_by(self, launcher: Launcher, image: Path, at: Path) -> Path:
        """The image's mount as ``launcher``'s user namespace sees it: an idmapped copy at
        ``at``; the image itself where the kernel cannot (Linux < 5.19: the sandbox then runs,
        its users owning no file of the image, and metald says so once)."""
        if is_mounted(at):
            return at
        try:
            linux.mount_idmapped(str(image), str(at), f"/proc/{launcher.pid}/ns/user")
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise VmError(f"cannot map the image's owners: {exc}") from exc
            if not self._unmapped_said:
                self._unmapped_said = True
                event(_log, "sandbox users own no file of their image", logging.WARNING,
                      error=str(exc))  # fmt: skip
            return image
        return at

    # -- images: each rootfs mounted read-only once per host, under every VM of it -----------
    def _images_dir(self) -> Path:
        d = self.run_dir / "images"
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
        return d

    @contextlib.contextmanager
    def _images_lock(self) -> Iterator[None]:
        """Host-wide (every metald on the host shares ``run_dir``): image mounts and the
        overlays on them change only under it."""
        fd = os.open(self._images_dir() / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _image(self, rootfs: Path) -> Path:
        """The image's shared read-only mount (made if need be; call under the lock). One mount
        per image, whatever the number of its VMs: its pages are cached once, and a boot of an
        image already running skips the loop device and the ext4 mount. Keyed by the file's
        identity, so a file replaced at the same path is a new image."""
        st = rootfs.stat()
        ident = f"{rootfs.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
        lower = (
            self._images_dir()
            / hashlib.sha1(ident.encode(), usedforsecurity=False).hexdigest()[:16]
        )
        if is_mounted(lower):
            self._idle_since(lower).unlink(missing_ok=True)  # in use again
            return lower
        lower.mkdir(exist_ok=True, mode=0o755)
        # mount(2) directly (two fork+execs of util-linux less on the boot path); the command
        # is the fallback for kernels without LOOP_CONFIGURE (< 5.8)
        try:
            linux.mount_ext4_ro(str(rootfs), str(lower))
        except linux.Unsupported:
            # noload: never replay the journal of an image we only read
            _run(["mount", "-t", "ext4", "-o", "loop,ro,noload", str(rootfs), str(lower)])
        except OSError as exc:
            raise VmError(f"cannot mount {rootfs}: {exc}") from exc
        return lower

    @staticmethod
    def _idle_since(lower: Path) -> Path:
        """Marker of a kept image no VM stands on: its mtime says since when (host-wide)."""
        return lower.with_name(lower.name + ".idle")

    def _release_image(self, lower: Path, *, keep: bool = True) -> None:
        """An image mount a VM no longer stands on: unmounted (and its loop device) once no
        overlay stands on it, or, with ``keep`` and :attr:`image_keep_s`, kept mounted and
        marked idle from now (:meth:`release_unused_images` unmounts it when that is over)."""
        with self._images_lock():
            if _overlays_on(lower) or _copies_of(lower):
                return
            if keep and self.image_keep_s > 0 and is_mounted(lower):
                self._idle_since(lower).touch()
                return
            self._unmount([str(lower)])
            if not is_mounted(lower):
                with contextlib.suppress(OSError):
                    lower.rmdir()
                self._idle_since(lower).unlink(missing_ok=True)

    def release_unused_images(self, *, idle_for: float = 0.0) -> None:
        """Unmount every shared image no VM stands on, with ``idle_for``: only those idle
        (their last VM gone) that long. Also what a metald that died between a VM's deletion
        and its image's release left."""
        images = self.run_dir / "images"
        if not self.root or not images.is_dir():
            return
        now = time.time()
        for lower in images.iterdir():
            if not lower.is_dir():
                continue
            if idle_for > 0:
                try:
                    since = self._idle_since(lower).stat().st_mtime
                except FileNotFoundError:
                    continue  # in use (or being mounted): not idle
                if now - since < idle_for:
                    continue
            self._release_image(lower, keep=False)

    def base_dir(self, vm_id: str) -> Path:
        return self.run_dir / vm_id

    @staticmethod
    def _unmount(mounts: list[str]) -> None:
        for m in reversed(mounts):
            if is_mounted(Path(m)):
                # umount(2) itself (a VM has three mounts: three fork+execs less on a deletion);
                # image loop devices free themselves (autoclear, set by whoever mounted them)
                with contextlib.suppress(OSError):
                    linux.umount(m)
            if is_mounted(Path(m)):
                # busy: detach lazily (-d: and the loop device, should autoclear be missing)
                subprocess.run(["umount", "-l", "-d", m], capture_output=True, check=False)

    def command(self, spec: VmSpec, tree: Path) -> list[str]:
        """The whole command line (also used by the bench as the baseline)."""
        return [*self.prefix(spec.net, spec.run_as), *self.bwrap_argv(spec, tree)]

    def prefix(self, net: NetAttachment, run_as: tuple[int, int] | None = None) -> list[str]:
        """What runs before bwrap: as root, enter the VM's network namespace and become the
        unprivileged uid/gid (nothing without root)."""
        if not self.root:
            return []
        base = self._ids_for(net, run_as)
        if base is not None:
            # nsenter drops to the range's first uid/gid itself once in the namespace (-S/-G:
            # setgroups(0), setgid, setuid; no capability is left on the host), then a user
            # namespace of its own, whose ids metald maps (_map_ids): the sandbox's root is
            # that uid, its other users the rest of the range. (metald's network module
            # lowered ip_unprivileged_port_start in this netns when it made it, so the app
            # may bind ports < 1024 there)
            return ["nsenter", f"--net=/run/netns/{net.netns}", "-S", str(base), "-G", str(base),
                    "--", "unshare", "--user", "--"]  # fmt: skip
        uid, gid = run_as or self.run_as
        if net.mode == "netns":
            return ["nsenter", f"--net=/run/netns/{net.netns}", "-S", str(uid), "-G", str(gid),
                    "--"]  # fmt: skip
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]

    def launcher(
        self, net: NetAttachment, log: Path, *, cwd: Path | str = "/",
        run_as: tuple[int, int] | None = None,
    ) -> Launcher:  # fmt: skip
        """The VM's process made ahead of its boot, in ``net``'s namespace as the unprivileged
        user (in its user namespace, with its ids mapped, on a VM link of a root host),
        waiting for its bwrap command line (see ``drivers.base.Launcher``; made by metald's
        ``NetnsPool`` for its spares). ``log`` must be on the file system of the jails: the
        boot renames it to the VM's console log."""
        launcher = Launcher(self.prefix(net, run_as), log=log, cwd=cwd)
        base = self._ids_for(net, run_as)
        if base is not None:
            try:
                _map_ids(launcher.pid, base)
            except (OSError, VmError) as exc:
                launcher.discard()
                raise VmError(f"cannot map the sandbox's users: {exc}; see {log}") from exc
        return launcher

    def _cold_launcher(self, spec: VmSpec) -> Launcher:
        return self.launcher(spec.net, spec.log_path, cwd=spec.workdir, run_as=spec.run_as)

    def _ids_for(self, net: NetAttachment, run_as: tuple[int, int] | None) -> int | None:
        """The first host id of the sandbox's own range (see :meth:`prefix`), or None: it runs
        as one host id (``run_as`` asked for, not a VM link of a root host, or no ranges
        here)."""
        base = uid_base(net) if run_as is None else None
        return base if base is not None and self.maps_ids() else None

    def mapped(self, spec: VmSpec) -> bool:
        """Whether the sandbox gets a range of host ids of its own (see :meth:`prefix`)."""
        return self._ids_for(spec.net, spec.run_as) is not None

    def bwrap_argv(self, spec: VmSpec, tree: Path) -> list[str]:
        env = {"PATH": _PATH, "HOSTNAME": spec.vm_id.replace("_", "-").lower()[:63]}
        env.update(spec.env)
        # in its own user namespace already (mapped): bwrap runs as its root, and the sandbox
        # keeps what a container's root keeps in it (CAPS: users, files, signals, low ports;
        # no mounts); else bwrap makes one with its one user as root, with no capability
        one_user = ["--unshare-user", "--uid", "0", "--gid", "0"]
        user = _caps_args() if self.mapped(spec) else one_user
        argv = [
            BWRAP, *user,
            "--unshare-pid", "--as-pid-1", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", env["HOSTNAME"],
            "--bind", str(tree), "/", "--proc", "/proc", "--dev", "/dev",
            "--size", str(writable_bytes(spec.memory_bytes)), "--tmpfs", "/tmp",
            "--new-session", "--clearenv",
        ]  # fmt: skip
        # bwrap and the sandbox die with bwrap's parent, the launcher's shell (which outlives
        # metald): whichever of the three is killed, the sandbox goes with it, as a VM with
        # its VMM
        argv.append("--die-with-parent")
        for k, v in sorted(env.items()):
            argv += ["--setenv", k, v]
        init = "/.vminit/init" if (tree / ".vminit" / "init").exists() else "/sbin/init"
        argv.append(init)
        return argv

    def boot(self, spec: VmSpec) -> VmRuntime:
        launcher = spec.launcher
        mounts: list[str] = []
        image: Path | None = None
        try:
            if launcher is not None and (spec.run_as not in (None, self.run_as)
                                         or not launcher.alive()):  # fmt: skip
                launcher.discard()  # made for another user, or dead (killed while waiting)
                launcher = None
            if launcher is None:
                launcher = self._cold_launcher(spec)
            else:
                launcher.adopt_log(spec.log_path)
            # the launcher first: the tree's owners are seen through its user namespace
            tree, mounts, image = self._tree_dir(spec, launcher)
            argv = self.bwrap_argv(spec, tree)
            try:
                pid = launcher.run(argv, cgroup=spec.cgroup, supervise=True)
            except VmError:
                if spec.launcher is not launcher:
                    raise
                # the spare died since (killed): start one (same ids: the tree stays right)
                launcher = self._cold_launcher(spec)
                pid = launcher.run(argv, cgroup=spec.cgroup, supervise=True)
        except (OSError, VmError) as exc:
            if launcher is not None:
                launcher.discard()  # (unless it runs)
            self._unmount(mounts)
            if image is not None:
                self._release_image(image)
            raise VmError(f"cannot start bwrap: {exc}") from exc
        start = pid_start_time(pid) or 0
        return VmRuntime(
            driver=self.name,
            pid=pid,
            pid_start=start,
            workdir=str(spec.workdir),
            log_path=str(spec.log_path),
            mounts=mounts,
            extra={
                "cgroup": [str(p) for p in spec.cgroup.procs_files()] if spec.cgroup else [],
                "base": str(self.base_dir(spec.vm_id)) if self.root else None,
                "image": str(image) if image is not None else None,
                # pid is the launcher's shell, bwrap its child (older runtimes: pid is bwrap)
                "supervisor": True,
            },
        )

    def _pids(self, rt: VmRuntime) -> list[int]:
        pids: set[int] = set()
        for f in rt.extra.get("cgroup", []):
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in Path(f).read_text().split())
        if process_alive(rt.pid, rt.pid_start):
            pids.update(process_tree(rt.pid))
        return sorted(pids)

    def stop(self, runtime: VmRuntime, timeout: float) -> None:
        # PID 1 of the sandbox only gets signals it has a handler for, so TERM goes to everyone
        # inside and the app decides; whatever is left after ``timeout`` is killed. The
        # launcher's shell and bwrap are spared: they exit when the sandbox does (and a bwrap
        # that dies first takes the sandbox with it, ungracefully).
        spared = self._outside(runtime)
        for pid in self._pids(runtime):
            if pid not in spared:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
        wait_exit(runtime.pid, runtime.pid_start, timeout)
        self._kill(runtime)

    @staticmethod
    def _outside(rt: VmRuntime) -> set[int]:
        """The VM's processes outside its sandbox: the launcher's shell and bwrap (older
        runtimes: bwrap alone)."""
        outside = {rt.pid}
        if rt.extra.get("supervisor"):
            outside.update(children(rt.pid))
        return outside

    def _kill(self, rt: VmRuntime) -> None:
        deadline = time.monotonic() + 5
        while True:
            pids = self._pids(rt)
            if not pids:
                break
            outside = self._outside(rt)
            inner = [p for p in pids if p not in outside]
            # the sandbox first (bwrap reaps it: killed with it, its pid 1 would be left a
            # zombie of the host's init), then the shell and bwrap once it is gone
            for pid in inner or pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            reap(rt.pid)
            if time.monotonic() > deadline:
                raise VmError(f"sandbox {rt.workdir}: processes {pids} survive SIGKILL")
            time.sleep(0.002)
        reap(rt.pid, wait=2.0)

    def delete(self, runtime: VmRuntime) -> None:
        self._kill(runtime)
        self._unmount(runtime.mounts)
        for m in runtime.mounts:
            if is_mounted(Path(m)):
                raise VmError(f"cannot unmount {m}")
        image = runtime.extra.get("image")
        if image:
            self._release_image(Path(image))
        base = runtime.extra.get("base")
        if base:
            shutil.rmtree(base, ignore_errors=True)

    def remove_leftovers(self, vm_id: str) -> None:
        """What :meth:`boot` mounted for ``vm_id`` when no runtime of it was recorded (a boot
        cut short by a crash): its overlay, tmpfs and run dir, and the image it held."""
        base = self.base_dir(vm_id)
        if not self.root or not base.is_dir():
            return
        mounts = [base, base / "lower", base / "root"]
        image = self._image_under([m for m in mounts if is_mounted(m)])
        self._unmount([str(m) for m in mounts])
        for m in mounts:
            if is_mounted(m):
                raise VmError(f"cannot unmount {m}")
        if image is not None:
            self._release_image(image)
        shutil.rmtree(base, ignore_errors=True)

    def _image_under(self, mounts: list[Path]) -> Path | None:
        """The shared image mount that one of a VM's ``mounts`` stands on (as the overlay's
        lower layer or as its copy)."""
        lowers = {Path(lw) for at, lws in _overlays() if Path(at) in mounts for lw in lws}
        images = self.run_dir / "images"
        for m in [*lowers, *mounts]:
            if m.parent == images:
                return m
            for copy in _copies_of(m):
                if Path(copy).parent == images:
                    return Path(copy)
        return None

    def inspect(self, runtime: VmRuntime) -> bool:
        alive = process_alive(runtime.pid, runtime.pid_start)
        if not alive:
            reap(runtime.pid)
        return alive

    def stats(self, runtime: VmRuntime, spec: VmSpec) -> VmStats:
        if spec.cgroup is not None:
            return VmStats(spec.cgroup.cpu_time_ns(), spec.cgroup.memory_bytes(), 0, 0)
        cpu = mem = 0
        hz, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        for pid in self._pids(runtime):
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                f = stat[stat.rindex(")") + 2 :].split()
                cpu += (int(f[11]) + int(f[12])) * 1_000_000_000 // hz
                mem += int(f[21]) * page
        return VmStats(cpu, mem, 0, 0)

    def recover(self, runtime: VmRuntime) -> bool:
        image = runtime.extra.get("image")
        return (
            process_alive(runtime.pid, runtime.pid_start)
            and all(is_mounted(Path(m)) for m in runtime.mounts)
            and (not image or is_mounted(Path(image)))
        )
