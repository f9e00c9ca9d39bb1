"""Real boots: the test image under ``sandbox`` and ``qemu`` answers HTTP 200, and stop/delete
leave no process, interface, netns, mount or cgroup behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from unkey_deploy.core.config import MetaldConfig
from unkey_deploy.core.errors import DeadlineExceeded, IllegalTransition, VmError
from unkey_deploy.core.procs import children
from unkey_deploy.metald import models
from unkey_deploy.metald.api import read_consoles
from unkey_deploy.metald.drivers.base import VmRuntime, VmSpec, process_alive, reap
from unkey_deploy.metald.drivers.sandbox import SandboxDriver, uid_base
from unkey_deploy.metald.kernel import KernelPaths
from unkey_deploy.metald.service import CreateVm, Metald, Scheduler, Vm
from unkey_deploy.metald.states import VmState

MetaldFactory = Callable[..., Metald]

pytestmark = pytest.mark.root


def _mounts_under(path: Path) -> list[str]:
    return [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(path))
    ]


def _zombie_of_init(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return state == "Z" and ppid == "1"


class Trace:
    """What a booted VM holds on the host, recorded so we can check it is all gone later."""

    def __init__(self, md: Metald, vm_id: str) -> None:
        vm = md.get(vm_id)
        row = md._row(vm_id)
        self.rt = VmRuntime.from_json(row.runtime)
        self.cgroup_dirs = md.cgroups.paths_for(vm_id).dirs()
        self.iface = vm.net.host_iface if vm.net else None
        self.netns = vm.net.netns if vm.net else None
        self.jail = md.jails.path(vm_id)
        self.state_dir = md.state_dir
        self.pids = md.cgroups.paths_for(vm_id).pids()

    def kill_guest(self) -> None:
        """SIGKILL what runs inside the sandbox, sparing the launcher's shell and bwrap (they
        exit once it is gone; killed with it, bwrap would leave its pid 1 a zombie of the
        host's init)."""
        outside = {self.rt.pid, *children(self.rt.pid)}
        for pid in self.pids:
            if pid not in outside:
                with contextlib.suppress(ProcessLookupError):  # httpd's per-request children
                    os.kill(pid, signal.SIGKILL)

    def assert_present(self) -> None:
        assert Path(f"/proc/{self.rt.pid}").exists()
        assert self.pids, "the VM's processes should be in its cgroup"
        assert all(d.is_dir() for d in self.cgroup_dirs) and self.cgroup_dirs
        if self.iface:
            assert Path(f"/sys/class/net/{self.iface}").exists()
        if self.netns:
            assert Path(f"/run/netns/{self.netns}").exists()
        assert self.jail.is_dir()

    def assert_gone(self, *, orphan_zombies: bool = False) -> None:
        """Nothing of the VM is left. ``orphan_zombies``: its processes may remain as zombies
        of the host's init (they run nothing; an init that reaps, unlike this test machine's,
        collects them), what killing a sandbox's bwrap from outside leaves."""
        for pid in [self.rt.pid, *self.pids]:
            if orphan_zombies and _zombie_of_init(pid):
                continue
            assert not Path(f"/proc/{pid}").exists(), f"process {pid} is still there"
        assert not any(d.exists() for d in self.cgroup_dirs), "cgroup left behind"
        if self.iface:
            assert not Path(f"/sys/class/net/{self.iface}").exists(), "interface left behind"
        if self.netns:
            assert not Path(f"/run/netns/{self.netns}").exists(), "netns left behind"
        assert not self.jail.exists(), "jail left behind"
        if self.rt.qmp_socket:
            assert not Path(self.rt.qmp_socket).exists(), "QMP socket left behind"
        assert _mounts_under(self.state_dir) == [], "mount left behind"
        base = self.rt.extra.get("base")
        if base:
            assert _mounts_under(Path(base)) == [], "mount left behind"
            assert not Path(base).exists(), "sandbox run dir left behind"


def _running(md: Metald, rootfs: Path) -> Vm:
    """A VM of the test image (64 MiB), booted here and answering."""
    vm = md.create_vm(CreateVm("dep_test", "cust_a", rootfs, memory_bytes=64 << 20))
    md.boot(vm.vm_id)
    return md.wait_ready(vm.vm_id, timeout=10)


def _boot_and_check(md: Metald, rootfs: Path, timeout: float) -> tuple[str, Trace]:
    vm = md.create_vm(
        CreateVm("dep_test", "cust_a", rootfs, vcpus=1, memory_bytes=128 << 20,
                 env={"GREETING": "it's \"quoted\" $HOME"})
    )  # fmt: skip
    assert vm.state == VmState.PENDING and vm.host_id == md.host_id
    md.boot(vm.vm_id)
    vm = md.wait_ready(vm.vm_id, timeout=timeout)
    assert vm.state == VmState.RUNNING
    r = httpx.get(md.endpoint(vm.vm_id) + "/", timeout=5)
    assert r.status_code == 200
    assert r.text == "unkey-test-app\n"
    # the request's env reached the app through the image's /.vminit/env
    env = httpx.get(md.endpoint(vm.vm_id) + "/cgi-bin/env", timeout=5).text
    assert 'GREETING=it\'s "quoted" $HOME\n' in env
    assert "PORT=8080\n" in env
    trace = Trace(md, vm.vm_id)
    trace.assert_present()
    return vm.vm_id, trace


def test_sandbox_boots_serves_http_and_cleans_up(make_metald: MetaldFactory, rootfs: Path) -> None:
    md = make_metald("sandbox")
    assert md.driver.name == "sandbox"
    own_cgroups = Path("/proc/self/cgroup").read_text()
    vm_id, trace = _boot_and_check(md, rootfs, timeout=10)
    vm = md.get(vm_id)
    # the boot's cgroup work (the VM's join, metald's prime of the kernel lock) never moves
    # metald itself: it is neither limited nor metered as the VM
    assert Path("/proc/self/cgroup").read_text() == own_cgroups
    assert os.getpid() not in trace.pids
    assert vm.net is not None and vm.net.mode == "netns"
    # everything of the sandbox runs as the first uid of the VM's own range of host ids (its
    # root), unprivileged on the host, with no supplementary group
    ids = uid_base(vm.net)
    assert ids is not None and ids >= 524288
    for pid in trace.pids:
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        assert status["Uid"].split() == [str(ids)] * 4, (pid, status["Uid"])
        assert status["Gid"].split() == [str(ids)] * 4, (pid, status["Gid"])
        assert status["Groups"].split() == [], (pid, status["Groups"])
    # the app runs as pid 1 of its own pid namespace, with the env metald passed
    env = httpx.get(md.endpoint(vm_id) + "/cgi-bin/env", timeout=5).text
    assert f"HOSTNAME={vm_id.replace('_', '-').lower()}" in env
    # metering contract
    mt = md.meter_target(vm_id)
    assert mt.pid == trace.rt.pid and mt.key.vm_id == vm_id and mt.key.vcpus == 1
    assert mt.cgroup_v1_cpuacct_dir is not None and mt.cgroup_v1_cpuacct_dir.is_dir()
    assert mt.host_iface == vm.net.host_iface
    limit = int((md.cgroups.paths_for(vm_id).v1["memory"] / "memory.limit_in_bytes").read_text())
    assert limit == 128 << 20
    quota = int((md.cgroups.paths_for(vm_id).v1["cpu"] / "cpu.cfs_quota_us").read_text())
    assert quota == 100_000
    with pytest.raises(IllegalTransition):
        md.boot(vm_id)
    with pytest.raises(IllegalTransition):
        md._set_state(vm_id, VmState.PENDING)
    md.stop(vm_id)
    assert md.get(vm_id).state == VmState.STOPPED
    trace.assert_gone()
    with pytest.raises(IllegalTransition):
        md.stop(vm_id)
    # a stopped VM boots again as a new instance
    old_instance = md.get(vm_id).instance_id
    md.boot(vm_id)
    md.wait_ready(vm_id, timeout=10)
    assert md.get(vm_id).instance_id != old_instance
    trace2 = Trace(md, vm_id)
    md.delete(vm_id)
    trace2.assert_gone()
    assert md.list() == []


def test_sandbox_vms_of_one_image_share_its_read_only_mount(
    make_metald: MetaldFactory, rootfs: Path
) -> None:
    """One read-only mount of an image per host, whatever the number of its VMs (its pages are
    cached once); each VM writes in its own layer; the mount goes with the last VM (kept for
    none: ``image_keep_s`` = 0)."""
    md = make_metald("sandbox", image_keep_s=0)
    vms = []
    for who in ("first", "second"):
        vm = md.create_vm(CreateVm("dep_share", "cust_a", rootfs, memory_bytes=64 << 20,
                                   env={"WHO": who}))  # fmt: skip
        md.boot(vm.vm_id)
        vms.append(md.wait_ready(vm.vm_id, timeout=10))
    images = [VmRuntime.from_json(md._row(v.vm_id).runtime).extra["image"] for v in vms]
    assert images[0] == images[1] is not None
    image = Path(images[0])
    assert _mounts_under(image) == [str(image)], "one mount of the image for both VMs"
    for vm, who in zip(vms, ("first", "second"), strict=True):  # each its own writable layer
        env = httpx.get(md.endpoint(vm.vm_id) + "/cgi-bin/env", timeout=5).text
        assert f"WHO={who}\n" in env
    md.delete(vms[0].vm_id)
    assert _mounts_under(image) == [str(image)], "the other VM still stands on it"
    assert httpx.get(md.endpoint(vms[1].vm_id) + "/", timeout=5).status_code == 200
    md.delete(vms[1].vm_id)
    assert _mounts_under(image) == [] and not image.exists(), "the image mount outlived its VMs"


def _mount_id(path: Path) -> str | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        if f[4] == str(path):
            return f[0]
    return None


def test_sandbox_image_is_kept_a_while_after_its_last_vm(
    tmp_path: Path, engine: Engine, subnet: str, kernel: KernelPaths, rootfs: Path
) -> None:
    """``image_keep_s``: the next VM of an image whose last VM just went finds it mounted (the
    same mount, its files cached); once idle that long it is unmounted, and an unused one goes
    when metald stops. (Its own run dir: image mounts are shared host-wide, and another metald
    of the host, a parallel test's, that stops releases the unused ones.)"""
    run_dir = Path(tempfile.mkdtemp(prefix="unkey-test-run-", dir="/run"))
    run_dir.chmod(0o755)  # the unprivileged bwrap reaches the trees through it
    cfg = MetaldConfig(driver="sandbox", host_name="h1", subnet=subnet, stop_timeout_s=0.5,
                       image_keep_s=0.5)  # fmt: skip
    md = Metald(cfg, engine, tmp_path / "md", kernel=kernel, driver=SandboxDriver(run_dir=run_dir))
    try:
        vm = md.create_vm(CreateVm("dep_keep", "cust_a", rootfs, memory_bytes=64 << 20))
        md.boot(vm.vm_id)
        md.wait_ready(vm.vm_id, timeout=10)
        image = Path(VmRuntime.from_json(md._row(vm.vm_id).runtime).extra["image"])
        first = _mount_id(image)
        assert first is not None
        md.delete(vm.vm_id)
        assert _mount_id(image) == first, "kept after its last VM"
        md.reconcile()  # not idle long enough yet
        assert _mount_id(image) == first

        again = md.create_vm(CreateVm("dep_keep", "cust_a", rootfs, memory_bytes=64 << 20))
        md.boot(again.vm_id)
        md.wait_ready(again.vm_id, timeout=10)
        assert _mount_id(image) == first, "the next VM stands on the kept mount"
        time.sleep(0.6)
        md.reconcile()  # idle since? no: a VM stands on it
        assert _mount_id(image) == first
        assert httpx.get(md.endpoint(again.vm_id) + "/", timeout=5).status_code == 200

        md.delete(again.vm_id)
        deadline = time.monotonic() + 5
        while _mount_id(image) is not None and time.monotonic() < deadline:
            md.reconcile()
            time.sleep(0.05)
        assert _mount_id(image) is None and not image.exists(), "released once idle 0.5 s"

        # metald stopping (its VMs would run on) unmounts the kept images no VM stands on
        vm3 = md.create_vm(CreateVm("dep_keep", "cust_a", rootfs, memory_bytes=64 << 20))
        md.boot(vm3.vm_id)
        md.wait_ready(vm3.vm_id, timeout=10)
        md.delete(vm3.vm_id)
        assert _mount_id(image) is not None
        md.close()
        assert _mount_id(image) is None
    finally:
        md.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.qemu
def test_qemu_boots_serves_http_and_cleans_up(make_metald: MetaldFactory, rootfs: Path) -> None:
    md = make_metald("qemu", guest_dns=["192.0.2.53", "2001:db8::53"])
    caps = md.status()["drivers"]["qemu"]
    assert caps["available"] and caps["accel"] in ("tcg", "kvm")
    vm_id, trace = _boot_and_check(md, rootfs, timeout=90)
    vm = md.get(vm_id)
    assert vm.net is not None and vm.net.mode == "tap"
    stats = md.driver.stats(trace.rt, _spec_for_stats(md, vm_id))
    assert stats.disk_read_bytes > 0, "QMP query-blockstats should show the guest reading its disk"
    assert stats.cpu_time_ns > 0 and stats.memory_used_bytes > 0
    mt = md.meter_target(vm_id)
    assert mt.qmp_socket is not None and mt.qmp_socket.exists()
    # QEMU runs unprivileged (-runas) after opening its files
    status = Path(f"/proc/{trace.rt.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1] != "0"
    console = Path(trace.rt.log_path).read_text(errors="replace")
    assert "UNKEY_TEST_APP: serving on port 8080" in console
    # the guest's resolvers were written into its disk (metald.guest_dns)
    disk = md.jails.path(vm_id) / "rootfs.ext4"
    cat = ["debugfs", "-R", "cat /etc/resolv.conf", str(disk)]
    resolv = subprocess.run(cat, capture_output=True, text=True, check=True).stdout
    assert resolv == "nameserver 192.0.2.53\nnameserver 2001:db8::53\n"
    md.delete(vm_id)
    trace.assert_gone()
    assert md.list() == []


def _spec_for_stats(md: Metald, vm_id: str):  # type: ignore[no-untyped-def]
    from unkey_deploy.metald.drivers.base import NetAttachment, VmSpec

    vm = md.get(vm_id)
    return VmSpec(
        vm_id=vm.vm_id, instance_id=vm.instance_id or "", customer_id=vm.customer_id,  # type: ignore[arg-type]
        vcpus=vm.vcpus, memory_bytes=vm.memory_bytes, port=vm.port,
        workdir=md.jails.path(vm_id), rootfs=md.jails.path(vm_id) / "rootfs.ext4",
        net=vm.net or NetAttachment(mode="host"), cgroup=md.cgroups.paths_for(vm_id),
    )  # fmt: skip


def test_dead_vm_is_marked_failed_and_freed(make_metald: MetaldFactory, rootfs: Path) -> None:
    md = make_metald("sandbox")
    vm = _running(md, rootfs)
    trace = Trace(md, vm.vm_id)
    # the guest dies (its init and everything under it); bwrap and its launcher then exit.
    trace.kill_guest()
    # the kill is asynchronous: the reconciler notices on one of its next passes
    deadline = time.monotonic() + 10
    while md.get(vm.vm_id).state != VmState.FAILED and time.monotonic() < deadline:
        md.reconcile()
        time.sleep(0.02)
    failed = md.get(vm.vm_id)
    assert failed.state == VmState.FAILED
    assert failed.error and "exited" in failed.error
    trace.assert_gone()
    assert md.ips.leased() == {}


def test_a_sandboxs_users_are_its_images(make_metald: MetaldFactory, rootfs: Path) -> None:
    """A sandbox's users are those of its image, as in a VM: its root owns and writes what the
    image gives root, another user (``app``, uid 1000) writes its own files and not root's. On
    the host they are the VM's own range of unprivileged ids, never another VM's."""
    md = make_metald("sandbox")
    vms = [_running(md, rootfs) for _ in range(2)]
    out = httpx.get(md.endpoint(vms[0].vm_id) + "/cgi-bin/users", timeout=10).text
    assert "root-writes-root=ok\n" in out, out
    assert "app-writes-app=ok\n" in out, out
    assert "app-writes-root=" in out and "Permission denied" in out, out
    for line in ("owner /www 0:0", "owner /www/by-root 0:0", "owner /home/app 1000:1000",
                 "owner /home/app/by-app 1000:1000"):  # fmt: skip
        assert line + "\n" in out, out
    nets = [md.get(vm.vm_id).net for vm in vms]
    ids = [uid_base(net) for net in nets if net is not None]
    assert len(ids) == 2 and ids[0] != ids[1] and all(i is not None and i >= 524288 for i in ids)
    assert ids[0] is not None
    upper = md.driver.base_dir(vms[0].vm_id) / "upper"  # type: ignore[attr-defined]
    for f, owner in (("www/by-root", 0), ("home/app/by-app", 1000)):
        st = (upper / f).stat()
        assert (st.st_uid, st.st_gid) == (ids[0] + owner, ids[0] + owner), f


def test_a_host_that_denies_id_ranges_runs_sandboxes_as_one_user(
    make_metald: MetaldFactory, rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the trial of a sandbox's own id range fails (a host forbidding unprivileged user
    namespaces, or denying them capabilities), sandboxes run as one unprivileged host id, as
    bwrap maps it: they boot and serve, their users owning no file of the image."""
    monkeypatch.setattr(SandboxDriver, "maps_ids", lambda self: False)
    md = make_metald("sandbox")
    vm = _running(md, rootfs)
    trace = Trace(md, vm.vm_id)
    for pid in trace.pids:
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
        assert uids == ["65534"] * 4, (pid, uids)
    out = httpx.get(md.endpoint(vm.vm_id) + "/cgi-bin/users", timeout=10).text
    assert "root-writes-root=" in out and "Permission denied" in out, out
    md.delete(vm.vm_id)
    trace.assert_gone()


def test_a_kernel_without_idmapped_overlays_still_runs_sandboxes(
    make_metald: MetaldFactory, rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux < 5.19 cannot stack an overlay on an idmapped mount: the sandbox still boots and
    serves, its users owning no file of the image (as before there were ranges)."""
    import errno

    from unkey_deploy.metald import linux

    def unsupported(source: str, target: str, userns: str) -> None:
        raise OSError(errno.EINVAL, "mount_setattr: Invalid argument")

    monkeypatch.setattr(linux, "mount_idmapped", unsupported)
    md = make_metald("sandbox")
    vm = _running(md, rootfs)
    out = httpx.get(md.endpoint(vm.vm_id) + "/cgi-bin/users", timeout=10).text
    assert "root-writes-root=" in out and "Permission denied" in out, out
    trace = Trace(md, vm.vm_id)
    md.delete(vm.vm_id)
    trace.assert_gone()


def test_a_sandbox_writes_no_more_than_a_vm_could(make_metald: MetaldFactory, rootfs: Path) -> None:
    """What a sandbox writes to its root file system (where it may: its root owns no file of
    the image, so the image's world-writable directories), and to its /tmp, is bounded (half
    its memory each, as a tmpfs in a VM of that memory) and held in memory charged to the VM:
    an app writing more gets "No space left on device", never a host's disk."""
    md = make_metald("sandbox")
    vm = _running(md, rootfs)
    trace = Trace(md, vm.vm_id)
    cg = md.cgroups.paths_for(vm.vm_id)
    url = md.endpoint(vm.vm_id)
    for f in ("/var/tmp/fill", "/tmp/fill"):
        before = cg.memory_bytes()
        out = httpx.get(f"{url}/cgi-bin/write?48:{f}", timeout=30).text
        assert "No space left on device" in out and "exit=1" in out, out
        size = int(out.split("size=")[1])
        assert 31 << 20 <= size <= 32 << 20, out
        assert cg.memory_bytes() - before >= 30 << 20, "the VM's writes are not its memory"
        out = httpx.get(f"{url}/cgi-bin/write?0:{f}", timeout=30).text  # empty it again
        assert "exit=0" in out and "size=0" in out, out
    md.delete(vm.vm_id)
    trace.assert_gone()


def test_a_chatty_vm_cannot_fill_the_disk_with_its_console(
    make_metald: MetaldFactory, rootfs: Path
) -> None:
    """A VM's console log keeps its last ``console_keep_bytes`` on disk (the rest is freed in
    place by the reconcile loop), while `unkey logs` still reads its tail."""
    keep = 64 << 10
    md = make_metald("sandbox", console_keep_bytes=keep)
    vm = _running(md, rootfs)
    log = md.jails.path(vm.vm_id) / "console.log"
    r = httpx.get(md.endpoint(vm.vm_id) + "/cgi-bin/log?2048", timeout=30)  # 2 MiB
    assert r.text == "done\n"
    assert log.stat().st_size > 2 << 20
    deadline = time.monotonic() + 5
    while log.stat().st_blocks * 512 > 2 * keep + 8192 and time.monotonic() < deadline:
        md.reconcile()  # (compacts once a second)
        time.sleep(0.05)
    assert log.stat().st_blocks * 512 <= 2 * keep + 8192, "the console still takes the disk"
    assert log.stat().st_size > 2 << 20
    with md.engine.connect() as c:
        (console,) = read_consoles(c, "dep_test", tail=1 << 20)
    assert console.truncated and console.data.endswith(b"console-end\n")
    assert b"\0" not in console.data


@pytest.mark.parametrize("fault", ["database", "disk"])
def test_a_boot_failing_after_its_vm_started_leaves_nothing_running(
    make_metald: MetaldFactory, rootfs: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """The write that records a started VM fails (the database away for a moment, or a full
    disk for the local record): the boot fails and says why, and the VM it had started does
    not run on untracked."""
    md = make_metald("sandbox")
    vm = md.create_vm(CreateVm("dep_test", "cust_a", rootfs, memory_bytes=64 << 20))
    started: list[VmRuntime] = []
    boot = md.driver.boot

    def seen_boot(spec: VmSpec) -> VmRuntime:
        started.append(boot(spec))
        return started[-1]

    monkeypatch.setattr(md.driver, "boot", seen_boot)
    if fault == "database":
        transition = md._transition

        def failing(vm_id: str, target: VmState, **values: object) -> object:
            if target == VmState.BOOTING:
                raise sa.exc.OperationalError("UPDATE metald_vms", {}, Exception("disk I/O error"))
            return transition(vm_id, target, **values)

        monkeypatch.setattr(md, "_transition", failing)
    else:
        write = md._write_record

        def full(vm_id: str, **values: object) -> None:
            if "runtime" in values:
                raise OSError(28, "No space left on device")
            write(vm_id, **values)

        monkeypatch.setattr(md, "_write_record", full)
    with pytest.raises(VmError, match=r"disk I/O error|No space left"):
        md.boot(vm.vm_id)
    (rt,) = started
    assert md.get(vm.vm_id).state == VmState.FAILED
    assert not process_alive(rt.pid, rt.pid_start), "the started VM runs on"
    assert md.cgroups.paths_for(vm.vm_id).pids() == []
    assert not any(d.exists() for d in md.cgroups.paths_for(vm.vm_id).dirs())
    assert _mounts_under(Path(rt.extra["base"])) == [], "mount left behind"
    assert md.ips.leased() == {}


def test_a_boot_cut_short_by_a_crash_is_freed_by_the_next_metald(
    make_metald: MetaldFactory, rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """metald dies in a boot after the sandbox's file systems were mounted and before its
    runtime was recorded anywhere: the next metald of the host frees them, found by the VM's
    id (and the VM is failed)."""
    md = make_metald("sandbox")
    vm = md.create_vm(CreateVm("dep_test", "cust_a", rootfs, memory_bytes=64 << 20))
    sandbox = md.driver
    assert isinstance(sandbox, SandboxDriver)

    def crash(spec: VmSpec) -> VmRuntime:
        launcher = spec.launcher or sandbox._cold_launcher(spec)
        sandbox._tree_dir(spec, launcher)
        launcher.discard()  # (what dies with metald: it waits on metald's pipe)
        raise SystemExit("metald killed")

    monkeypatch.setattr(sandbox, "boot", crash)
    with pytest.raises(SystemExit):
        md.boot(vm.vm_id)
    base = sandbox.base_dir(vm.vm_id)
    assert _mounts_under(base), "the crash should have left the mounts"
    again = make_metald("sandbox")  # the same host, restarted
    assert again.get(vm.vm_id).state == VmState.FAILED
    assert _mounts_under(base) == [], "mount left behind"
    assert not base.exists()
    assert not any(d.exists() for d in again.cgroups.paths_for(vm.vm_id).dirs())


@pytest.mark.parametrize("victim", ["bwrap", "launcher"])
def test_a_sandbox_dies_with_its_bwrap_or_launcher(
    make_metald: MetaldFactory, rootfs: Path, victim: str
) -> None:
    """Killing only the sandbox's bwrap, or only the shell that launched it (the pid metald
    records), takes the whole sandbox down at once, as killing a VMM does its VM: nothing of
    it runs on unnoticed, even with no metald to clean up."""
    md = make_metald("sandbox")
    vm = _running(md, rootfs)
    trace = Trace(md, vm.vm_id)
    (bwrap,) = children(trace.rt.pid)
    assert Path(f"/proc/{bwrap}/comm").read_text().strip() == "bwrap"
    assert len(trace.pids) >= 3  # the shell, bwrap, the guest (its init execs its app)
    os.kill(bwrap if victim == "bwrap" else trace.rt.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while md.cgroups.paths_for(vm.vm_id).pids() and time.monotonic() < deadline:
        reap(trace.rt.pid)  # (metald's child: a zombie until reaped)
        time.sleep(0.01)
    assert md.cgroups.paths_for(vm.vm_id).pids() == [], "the sandbox outlived its bwrap"
    while md.get(vm.vm_id).state != VmState.FAILED and time.monotonic() < deadline + 5:
        md.reconcile()
        time.sleep(0.02)
    assert md.get(vm.vm_id).state == VmState.FAILED
    trace.assert_gone(orphan_zombies=True)


def test_a_host_stops_vms_all_at_once_and_keeps_heartbeating(
    make_metald: MetaldFactory, rootfs: Path
) -> None:
    """Deleting several VMs whose apps ignore SIGTERM (each waits ``stop_timeout_s``, then is
    killed): the host stops them all at once, and its reconcile loop heartbeats meanwhile (a
    host silent for ``host_lost_after_s`` is declared lost and its VMs are replaced)."""
    md = make_metald("sandbox", stop_timeout_s=1.5, host_lost_after_s=2.0)  # beats every 0.2 s
    vms = []
    for _ in range(3):
        vm = md.create_vm(CreateVm("dep_stop", "cust_a", rootfs, memory_bytes=64 << 20))
        md.boot(vm.vm_id)
        vms.append(md.wait_ready(vm.vm_id, timeout=10).vm_id)

    def states() -> list[VmState]:
        return [vm.state for vm in md.list()]

    md.start(interval=0.05)
    sched = Scheduler(md.engine)
    for vm_id in vms:
        sched.delete(vm_id)
    deadline = time.monotonic() + 5
    while states() != [VmState.STOPPING] * 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert states() == [VmState.STOPPING] * 3, "the three stop at once"
    beat = _heartbeat(md)
    while _heartbeat(md) == beat and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _heartbeat(md) > beat and VmState.STOPPING in states(), "no heartbeat while stopping"
    while md.list() and time.monotonic() < deadline + 10:
        time.sleep(0.05)
    assert md.list() == []
    sched.close()


class _SlowBoot(SandboxDriver):
    """The sandbox driver whose boot first takes a second (as a qemu boot copying a big rootfs
    without reflinks does)."""

    def boot(self, spec: VmSpec) -> VmRuntime:
        time.sleep(1.0)
        return super().boot(spec)


def test_a_host_boots_vms_at_once_and_keeps_heartbeating(
    tmp_path: Path, engine: Engine, subnet: str, kernel: KernelPaths, rootfs: Path
) -> None:
    """VMs the scheduler asks a host to boot (a deployment's replicas) boot side by side, and
    the host's reconcile loop heartbeats meanwhile."""
    cfg = MetaldConfig(driver="sandbox", host_name="h1", subnet=subnet, stop_timeout_s=0.5,
                       host_lost_after_s=2.0)  # fmt: skip
    md = Metald(cfg, engine, tmp_path / "md", kernel=kernel, driver=_SlowBoot())
    sched = Scheduler(engine)
    try:
        vms = [sched.create_vm(CreateVm("dep_boot", "cust_a", rootfs, memory_bytes=64 << 20))
               for _ in range(3)]  # fmt: skip
        for vm in vms:
            sched.boot(vm.vm_id)
        beat = _heartbeat(md)
        md.start(interval=0.05)
        deadline = time.monotonic() + 10
        while [v.state for v in md.list()] != [VmState.PREPARING] * 3:
            assert time.monotonic() < deadline, "the three never prepared at once"
            time.sleep(0.02)
        while _heartbeat(md) == beat:
            assert time.monotonic() < deadline, "no heartbeat while booting"
            time.sleep(0.02)
        assert VmState.PREPARING in [v.state for v in md.list()]
        for vm in vms:
            sched.wait_ready(vm.vm_id, timeout=20)  # another host's view: its agent's state
    finally:
        sched.close()
        md.shutdown()


def test_a_reconcile_pass_does_not_wait_for_booting_vms_probes(
    make_metald: MetaldFactory, rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A booting VM's readiness probe can wait out its connect timeout (a qemu guest whose
    network is not up yet): the pass probes its booting VMs side by side, off the pass, which
    goes on to the other VMs and its next round at once."""
    md = make_metald("sandbox")
    vms = [md.create_vm(CreateVm("dep_test", "cust_a", rootfs, memory_bytes=64 << 20))
           for _ in range(2)]  # fmt: skip
    for vm in vms:
        md.boot(vm.vm_id)
    release = threading.Event()
    probing: list[str] = []

    def slow_probe(vm: Vm, timeout: float = 0.5, path: str = "/") -> bool:
        probing.append(vm.vm_id)
        return release.wait(10)

    monkeypatch.setattr(md, "probe", slow_probe)
    one_pass = threading.Thread(target=md._pass)
    one_pass.start()
    try:
        one_pass.join(5)
        assert not one_pass.is_alive(), "the pass waited for a probe"
        deadline = time.monotonic() + 5
        while len(probing) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(probing) == sorted(vm.vm_id for vm in vms), "not probed side by side"
    finally:
        release.set()
        one_pass.join(10)
    md._drain()
    assert [md.get(vm.vm_id).state for vm in vms] == [VmState.RUNNING] * 2


def test_a_vms_host_checks_the_readiness_its_app_asked_for(
    tmp_path: Path, engine: Engine, subnet: str, kernel: KernelPaths, rootfs: Path
) -> None:
    """The app.yaml's healthcheck (path and port) is recorded with the VM, and the VM's host
    checks that, whoever waits for it (the deployer is another process: before, the host
    probed "/" on the app's port, so a failing health endpoint or port still made it running)."""
    cfg = MetaldConfig(driver="sandbox", host_name="h1", subnet=subnet, stop_timeout_s=0.5)
    md = Metald(cfg, engine, tmp_path / "md", kernel=kernel)
    sched = Scheduler(engine)
    try:
        md.start(interval=0.05)

        def vm(**health: Any) -> str:
            v = sched.create_vm(CreateVm("dep_h", "cust_a", rootfs, memory_bytes=64 << 20,
                                         **health))  # fmt: skip
            sched.boot(v.vm_id)
            return v.vm_id

        ok = vm(health_path="/cgi-bin/env")
        failing = vm(health_path="/cgi-bin/fail")  # answers 500
        elsewhere = vm(health_port=9)  # nothing listens there
        ready = sched.wait_ready(ok, timeout=20)
        assert ready.state == VmState.RUNNING and ready.health_path == "/cgi-bin/env"
        for vm_id in (failing, elsewhere):
            with pytest.raises(DeadlineExceeded):
                sched.wait_ready(vm_id, timeout=2)
            assert md.get(vm_id).state == VmState.BOOTING
            # the app itself serves: only its readiness check fails
            assert httpx.get(md.endpoint(vm_id) + "/", timeout=5).status_code == 200
        assert md.get(elsewhere).health_port == 9
    finally:
        sched.close()
        md.shutdown()


def _heartbeat(md: Metald) -> float:
    h = models.hosts
    with md.engine.connect() as c:
        q = sa.select(h.c.heartbeat_at).where(h.c.host_id == md.host_id)
        return float(c.execute(q).scalar_one())


def test_vms_survive_metald_restart(make_metald: MetaldFactory, rootfs: Path) -> None:
    md = make_metald("sandbox", name="h1")
    a = md.create_vm(CreateVm("dep_test", "cust_a", rootfs, memory_bytes=64 << 20))
    b = md.create_vm(CreateVm("dep_test", "cust_a", rootfs, memory_bytes=64 << 20))
    for v in (a, b):
        md.boot(v.vm_id)
        md.wait_ready(v.vm_id, timeout=10)
    leases = md.ips.leased()
    trace_b = Trace(md, b.vm_id)
    md.close()  # metald goes away; its VMs keep running
    assert md.network is not None and md.network.has_rules()  # their NAT and isolation stay
    trace_b.kill_guest()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{trace_b.rt.pid}/stat").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(trace_b.rt.pid, os.WNOHANG)  # the launcher was a child of this process
        time.sleep(0.01)
    time.sleep(0.05)
    md2 = make_metald("sandbox", name="h1")
    assert md2.host_id == md.host_id
    assert md2.get(a.vm_id).state == VmState.RUNNING
    assert httpx.get(md2.endpoint(a.vm_id) + "/", timeout=5).status_code == 200
    assert md2.get(b.vm_id).state == VmState.FAILED
    trace_b.assert_gone()
    # the surviving VM kept its address lease across the restart
    assert md2.ips.leased() == {a.vm_id: leases[a.vm_id]}
    # a metald that stops with no VM left removes its nftables tables (none pile up per host)
    md2.delete(a.vm_id)
    md2.close()
    assert md2.network is not None and not md2.network.has_rules()


def test_sandbox_without_root_paths(tmp_path: Path) -> None:
    """The non-root code path: tree extracted with debugfs (no mount), host network."""
    from unkey_deploy.core.net import free_port as free_tcp_port
    from unkey_deploy.core.procs import process_tree
    from unkey_deploy.metald.drivers.base import NetAttachment, VmSpec
    from unkey_deploy.metald.drivers.sandbox import SandboxDriver
    from unkey_deploy.testing.rootfs import build_test_rootfs

    port = free_tcp_port()
    image = build_test_rootfs(tmp_path / "img.ext4", port=port)
    drv = SandboxDriver()
    drv.root = False  # what metald does when it is not root
    spec = VmSpec(
        vm_id="vm_nonroot", instance_id="inst_x", customer_id="cust_a",  # type: ignore[arg-type]
        vcpus=1, memory_bytes=64 << 20, port=port, workdir=tmp_path / "jail", rootfs=image,
        net=NetAttachment(mode="host"), env={"GREETING": "from-env"},
    )  # fmt: skip
    drv.create(spec)
    rt = drv.boot(spec)
    assert rt.mounts == []
    deadline = time.monotonic() + 10
    while True:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/cgi-bin/env", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert r.status_code == 200 and "GREETING=from-env" in r.text
    pids = process_tree(rt.pid)
    drv.stop(rt, 0.2)
    drv.delete(rt)
    assert not drv.inspect(rt)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def test_burn_mode_uses_the_cpu_quota(make_metald: MetaldFactory, tmp_path: Path) -> None:
    """The test image's CPU burner runs inside the VM's cgroup, which accounts and caps it."""
    from unkey_deploy.testing.rootfs import build_test_rootfs

    image = build_test_rootfs(tmp_path / "burn.ext4", burn_cpus=2)
    md = make_metald("sandbox")
    vm = md.create_vm(CreateVm("dep_burn", "cust_a", image, vcpus=1, memory_bytes=64 << 20))
    md.boot(vm.vm_id)
    md.wait_ready(vm.vm_id, timeout=10)
    cg = md.cgroups.paths_for(vm.vm_id)
    t0, c0 = time.monotonic(), cg.cpu_time_ns()
    time.sleep(1.0)
    used = (cg.cpu_time_ns() - c0) / 1e9 / (time.monotonic() - t0)
    # two busy loops, one vCPU of quota: about one CPU-second per second, never two
    assert 0.3 < used < 1.25, used
    md.delete(vm.vm_id)


@pytest.mark.qemu
def test_qemu_user_mode_networking(tmp_path: Path, kernel) -> None:  # type: ignore[no-untyped-def]
    """What metald uses without root: QEMU user-mode networking, the app's port forwarded from
    127.0.0.1 only; no cgroup, no tap."""
    from unkey_deploy.core.net import free_port as free_tcp_port
    from unkey_deploy.metald.drivers.base import NetAttachment, VmSpec
    from unkey_deploy.metald.drivers.qemu import QemuDriver
    from unkey_deploy.testing.rootfs import build_test_rootfs

    jail = tmp_path / "jail"
    jail.mkdir()
    image = build_test_rootfs(jail / "rootfs.ext4")
    host_port = free_tcp_port()
    drv = QemuDriver(kernel, tmp_path / "state")
    spec = VmSpec(
        vm_id=f"vm_usermode{os.getpid()}", instance_id="inst_x", customer_id="cust_a",  # type: ignore[arg-type]
        vcpus=1, memory_bytes=128 << 20, port=8080, workdir=jail, rootfs=image,
        net=NetAttachment(mode="user", host_port=host_port), kernel=kernel,
    )  # fmt: skip
    argv = drv.command(spec)
    assert f"hostfwd=tcp:127.0.0.1:{host_port}-:8080" in " ".join(argv)
    rt = drv.boot(spec)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{host_port}/", timeout=1)
                break
            except httpx.HTTPError:
                assert drv.inspect(rt), Path(rt.log_path).read_text(errors="replace")
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 200 and r.text == "unkey-test-app\n"
        assert drv.recover(rt), "QMP query-status should say the guest runs"
        console = Path(rt.log_path).read_text(errors="replace")
        assert "UNKEY_INITRAMFS: power button watcher on /dev/input/event" in console
        # graceful stop: the ACPI power button reaches the guest, whose initramfs watcher sends
        # SIGTERM to init and, as the test app ignores it, syncs and powers off after 3 s
        # (no time bound here: under TCG on a loaded 2-core machine the guest's shutdown can
        # take a while; the log line proves it powered off itself rather than being killed)
        drv.stop(rt, 90)
        console = Path(rt.log_path).read_text(errors="replace")
        assert "reboot: Power down" in console, console[-2000:]
        assert "can't open" not in console, console[-2000:]
    finally:
        drv.stop(rt, 0.5)
        drv.delete(rt)
    assert not drv.inspect(rt) and not Path(f"/proc/{rt.pid}").exists()
    assert rt.qmp_socket and not Path(rt.qmp_socket).exists()


@pytest.mark.kvm
@pytest.mark.qemu
def test_qemu_under_kvm_when_it_really_works(make_metald: MetaldFactory, rootfs: Path) -> None:
    md = make_metald("qemu", guest_dns=["192.0.2.53", "2001:db8::53"])
    caps = md.status()["drivers"]["qemu"]
    if caps["accel"] != "kvm":
        pytest.skip(f"KVM cannot boot a guest on this host ({caps['reason']}); TCG is used")
    vm_id, trace = _boot_and_check(md, rootfs, timeout=30)
    assert "\0kvm\0" in Path(f"/proc/{trace.rt.pid}/cmdline").read_text()
    md.delete(vm_id)
    trace.assert_gone()


def test_launch_replica_for_the_orchestration(make_metald: MetaldFactory, rootfs: Path) -> None:
    from unkey_deploy.core.errors import DeadlineExceeded
    from unkey_deploy.metald.launch import launch_replica

    md = make_metald("sandbox")
    events: list[str] = []
    vm = launch_replica(md, deployment_id="dep_l", customer_id="cust_a", rootfs=rootfs, vcpus=1,
                        memory_bytes=64 << 20, port=8080, env={"A": "1"},
                        progress=lambda ph, msg, **_: events.append(f"{ph}: {msg}"))  # fmt: skip
    assert vm.state == VmState.RUNNING and vm.url
    assert httpx.get(vm.url + "/", timeout=5).status_code == 200
    assert [e.split(" ")[:2] for e in events] == [
        ["vm:", "scheduled"], ["vm:", "booting"], ["health:", "health"], ["vm:", vm.vm_id]
    ]  # fmt: skip
    assert events[2] == (
        f"health: health check: GET / on port 8080 of {vm.vm_id} until it answers with a"
        " status below 500 (up to 120 s)"
    )
    # an app that never answers on its port: the VM is deleted and the deadline reported
    with pytest.raises(DeadlineExceeded):
        launch_replica(md, deployment_id="dep_l", customer_id="cust_a", rootfs=rootfs, vcpus=1,
                       memory_bytes=64 << 20, port=9999, timeout=1.0)  # fmt: skip
    assert [v.vm_id for v in md.list()] == [vm.vm_id]
    md.delete(vm.vm_id)


def _lose_and_forget(md: Metald, vm_id: str) -> None:
    """The host stops heartbeating, is declared lost, the VM's deployment is stopped (its lost
    VM deleted: nowhere to place a replacement) and an operator forgets the host."""
    with md.engine.begin() as c:
        c.execute(models.hosts.update().where(models.hosts.c.host_id == md.host_id)
                  .values(heartbeat_at=time.time() - 3600))  # fmt: skip
    sched = Scheduler(md.engine)
    assert sched.sweep_lost_hosts() == [(vm_id, None)]
    sched.delete(vm_id)
    assert sched.forget_host(md.host_id)["vms"] == [vm_id]
    assert sched.hosts() == [] and sched.list() == []
    sched.close()


def test_a_forgotten_host_that_comes_back_frees_the_forgotten_vms(
    make_metald: MetaldFactory, rootfs: Path
) -> None:
    md = make_metald("sandbox", name="h1")
    a = _running(md, rootfs)
    trace_a = Trace(md, a.vm_id)
    _lose_and_forget(md, a.vm_id)
    trace_a.assert_present()  # nothing ran on the host meanwhile: the VM still runs there

    # its metald was only cut off: its next heartbeat finds no row, registers anew, frees a
    md.heartbeat()
    trace_a.assert_gone()
    assert not (md.state_dir / "vms" / f"{a.vm_id}.json").exists()
    (host,) = md.hosts()
    assert host["host_id"] == md.host_id and host["lost_at"] is None and host["schedulable"]
    assert md.ips.leased() == {}

    # it takes VMs again; then it is lost and forgotten while its metald is down (its VM keeps
    # running), and comes back by a restart
    b = md.create_vm(CreateVm("dep_test", "cust_a", rootfs, memory_bytes=64 << 20))
    assert b.host_id == md.host_id
    md.boot(b.vm_id)
    md.wait_ready(b.vm_id, timeout=10)
    trace_b = Trace(md, b.vm_id)
    md.close()
    _lose_and_forget(md, b.vm_id)
    md2 = make_metald("sandbox", name="h1")
    assert md2.host_id == md.host_id
    trace_b.assert_gone()
    assert md2.list() == [] and [h["host_id"] for h in md2.hosts()] == [md.host_id]
