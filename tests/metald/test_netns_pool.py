"""Sandbox links made ahead of boots (``MetaldConfig.netns_pool``): a boot takes a ready network
namespace + veth + address instead of making them, with the VM's process already waiting in it
(a ``Launcher``), the VM owns them like ones made at boot (its name, its lease, removed on
delete), the pool refills, and nothing of it outlives metald — neither on a clean shutdown nor
after a metald that died (the next start reclaims), nor after an operator forgot the host (and
its leases) while it was away."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from unkey_deploy.core.errors import VmError
from unkey_deploy.metald import models
from unkey_deploy.metald.drivers.base import Launcher, NetAttachment, VmRuntime
from unkey_deploy.metald.network import NetnsPool, iface_name, netns_name
from unkey_deploy.metald.service import CreateVm, Metald, Scheduler
from unkey_deploy.testing.rootfs import build_test_rootfs

MetaldFactory = Callable[..., Metald]

pytestmark = pytest.mark.root


def _iface_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _in_netns(ns: str) -> list[int]:
    """The processes whose network namespace is /run/netns/``ns``."""
    want = os.stat(f"/run/netns/{ns}").st_ino
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.stat(d / "ns" / "net").st_ino == want:
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def _uids(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return line.split()[1:]
    raise AssertionError(f"no Uid line for {pid}")


def test_boot_takes_a_ready_link_and_the_pool_refills(
    make_metald: MetaldFactory, tmp_path: Path
) -> None:
    # port 80: the unprivileged app may bind a low port in its namespace (metald lowered
    # ip_unprivileged_port_start there when it made the namespace, ahead of the boot)
    image = build_test_rootfs(tmp_path / "img80.ext4", port=80)
    md = make_metald("sandbox", netns_pool=2)
    pool = md.netns_pool
    assert pool is not None
    assert pool.wait_full(timeout=20)
    spares = md.ips.leased(pooled=True)
    assert len(spares) == 2 and md.ips.leased() == {}
    spare_ifaces = {iface_name(p) for p in spares}
    assert all(_iface_exists(i) for i in spare_ifaces)
    # each spare has its VM's process waiting in its namespace, already the unprivileged user
    # (the first of its own range of host ids, its user namespace's root)
    waiting = {p: _in_netns(netns_name(p)) for p in spares}
    assert all(len(pids) == 1 for pids in waiting.values()), waiting
    uids = {p: _uids(pids[0]) for p, pids in waiting.items()}
    assert all(len(set(u)) == 1 and int(u[0]) >= 524288 for u in uids.values()), uids
    assert len({u[0] for u in uids.values()}) == 2, "two spares share their ids"
    for p, pids in waiting.items():
        assert Path(f"/proc/{pids[0]}/uid_map").read_text().split() == ["0", uids[p][0], "65536"]

    vm = md.create_vm(CreateVm("dep_pool", "cust_a", image, memory_bytes=64 << 20, port=80))
    md.boot(vm.vm_id)
    md.wait_ready(vm.vm_id, timeout=10)
    got = md.get(vm.vm_id)
    assert got.net is not None and got.net.mode == "netns"
    # a spare's link, renamed to the VM's namespace, its lease now the VM's (same slot)
    assert got.net.host_iface in spare_ifaces
    assert got.net.netns == netns_name(vm.vm_id)
    assert Path(f"/run/netns/{got.net.netns}").exists()
    taken = next(p for p in spares if iface_name(p) == got.net.host_iface)
    assert not Path(f"/run/netns/{netns_name(taken)}").exists()
    assert md.ips.leased() == {vm.vm_id: spares[taken]}
    assert httpx.get(md.endpoint(vm.vm_id) + "/", timeout=5).text == "unkey-test-app\n"
    assert md.endpoint(vm.vm_id).endswith(":80")
    # the spare's waiting process became the VM's (bwrap), in the VM's cgroup, and its output
    # is the VM's console log
    rt = VmRuntime.from_json(md._row(vm.vm_id).runtime)
    assert rt.pid == waiting[taken][0]
    assert rt.pid in md.cgroups.paths_for(vm.vm_id).pids()
    assert Path(rt.log_path) == md.jails.path(vm.vm_id) / "console.log"
    assert "UNKEY_TEST_APP: serving on port 80" in Path(rt.log_path).read_text()

    assert pool.wait_full(timeout=20), "the pool refills after a take"
    assert len(md.ips.leased(pooled=True)) == 2

    md.delete(vm.vm_id)
    assert not _iface_exists(got.net.host_iface)
    assert not Path(f"/run/netns/{got.net.netns}").exists()
    assert md.ips.leased() == {}

    left = md.ips.leased(pooled=True)
    spare_pids = [pid for p in left for pid in _in_netns(netns_name(p))]
    assert len(spare_pids) == 2
    md.shutdown()
    assert md.ips.leased(pooled=True) == {}
    for p in left:
        assert not _iface_exists(iface_name(p))
        assert not Path(f"/run/netns/{netns_name(p)}").exists()
    for pid in spare_pids:
        assert not Path(f"/proc/{pid}").exists(), f"spare's process {pid} left behind"
    assert not list(md.jails.root.glob("pool_*")), "a spare's log left behind"


def test_a_launcher_whose_start_failed_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    launcher = Launcher(["nsenter", "--net=/run/netns/unkey-no-such-netns", "--"], log=log)
    pid = launcher.pid
    deadline = time.monotonic() + 5
    while launcher.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not launcher.alive()
    with pytest.raises(VmError, match=r"cannot start /bin/true.*console\.log"):
        launcher.run(["/bin/true"], cgroup=None)
    assert not Path(f"/proc/{pid}").exists()
    assert "unkey-no-such-netns" in log.read_text()  # nsenter's own words, for the operator
    with pytest.raises(VmError, match="used already"):
        launcher.run(["/bin/true"], cgroup=None)


def test_a_boot_whose_spare_process_was_killed_starts_one(
    make_metald: MetaldFactory, tmp_path: Path
) -> None:
    image = build_test_rootfs(tmp_path / "img.ext4", port=8080)
    md = make_metald("sandbox", netns_pool=1)
    assert md.netns_pool is not None and md.netns_pool.wait_full(timeout=20)
    (spare,) = md.ips.leased(pooled=True)
    (pid,) = _in_netns(netns_name(spare))
    os.kill(pid, 9)
    vm = md.create_vm(CreateVm("dep_pool", "cust_a", image, memory_bytes=64 << 20))
    md.boot(vm.vm_id)
    md.wait_ready(vm.vm_id, timeout=10)
    assert md.get(vm.vm_id).net.host_iface == iface_name(spare)  # type: ignore[union-attr]
    rt = VmRuntime.from_json(md._row(vm.vm_id).runtime)
    assert rt.pid != pid and _in_netns(netns_name(vm.vm_id)) != []
    assert "UNKEY_TEST_APP: serving on port 8080" in Path(rt.log_path).read_text()


def test_an_unused_launcher_ends_with_its_input(tmp_path: Path) -> None:
    # what happens to a spare's process when its metald dies: the pipe it waits on closes
    launcher = Launcher([], log=tmp_path / "console.log")
    assert launcher._proc is not None and launcher._proc.stdin is not None
    launcher._proc.stdin.close()
    assert launcher._proc.wait(timeout=5) == 0


def test_spares_of_a_dead_metald_are_reclaimed(make_metald: MetaldFactory) -> None:
    md = make_metald("sandbox", name="h1", netns_pool=0)  # only the orphan below is a spare
    assert md.network is not None
    # a spare whose metald died (no close): its link and lease stay behind
    orphan = NetnsPool(md.network, md.ips, 1)
    orphan._make_one()
    (pool_id,) = md.ips.leased(pooled=True)
    assert _iface_exists(iface_name(pool_id))
    assert Path(f"/run/netns/{netns_name(pool_id)}").exists()
    md.close()

    md2 = make_metald("sandbox", name="h1", netns_pool=0)  # the restart, same host
    assert md2.host_id == md.host_id
    assert md2.ips.leased(pooled=True) == {}
    assert not _iface_exists(iface_name(pool_id))
    assert not Path(f"/run/netns/{netns_name(pool_id)}").exists()


def test_a_spare_that_could_not_be_removed_is_removed_at_the_next_start(
    make_metald: MetaldFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removing a spare's links fails (at metald's stop): the spare keeps its lease, so the
    next start of the host finds it and removes it (before, the lease went anyway and the
    links stayed on the host for good)."""
    md = make_metald("sandbox", name="h1", netns_pool=1)
    assert md.network is not None and md.netns_pool is not None
    assert md.netns_pool.wait_full(timeout=20)
    (pool_id,) = md.ips.leased(pooled=True)

    def failing(att: object) -> None:
        raise VmError("ip link del: Device or resource busy")

    monkeypatch.setattr(md.network, "detach", failing)
    md.close()
    monkeypatch.undo()
    assert _iface_exists(iface_name(pool_id))
    assert pool_id in md.ips.leased(pooled=True), "the spare's lease went with its links left"
    md2 = make_metald("sandbox", name="h1", netns_pool=0)  # the restart, same host
    assert md2.ips.leased(pooled=True) == {}
    assert not _iface_exists(iface_name(pool_id))
    assert not Path(f"/run/netns/{netns_name(pool_id)}").exists()


def test_a_spare_whose_lease_went_is_not_handed_out(
    make_metald: MetaldFactory, tmp_path: Path
) -> None:
    """A spare made while its host was forgotten (its lease deleted, the ready spares dropped)
    is not kept; one whose lease went anyway is discarded at a boot, which then makes its
    link itself: the boot never fails for it."""
    md = make_metald("sandbox", name="h1", netns_pool=0)
    assert md.network is not None

    def drop_meanwhile(pool_id: str, att: NetAttachment) -> None:
        made_across_drop.drop()  # (a heartbeat finding its host forgotten)

    made_across_drop = NetnsPool(md.network, md.ips, 1, warm=drop_meanwhile)
    try:
        made_across_drop._make_one()
        assert made_across_drop.ready() == 0
        assert md.ips.leased(pooled=True) == {}
    finally:
        made_across_drop.close()
    md.close()

    md = make_metald("sandbox", name="h1", netns_pool=1)  # (restarted)
    assert md.netns_pool is not None and md.netns_pool.wait_full(timeout=20)
    (pool_id,) = md.ips.leased(pooled=True)
    with md.engine.begin() as c:  # what forgetting the host does to it
        c.execute(models.ip_leases.delete().where(models.ip_leases.c.vm_id == pool_id))
    image = build_test_rootfs(tmp_path / "img.ext4", port=8080)
    vm = md.create_vm(CreateVm("dep_pool", "cust_a", image, memory_bytes=64 << 20))
    md.boot(vm.vm_id)
    md.wait_ready(vm.vm_id, timeout=10)
    assert not _iface_exists(iface_name(pool_id)), "the stale spare was left"
    md.delete(vm.vm_id)


def _forget(md: Metald) -> None:
    """md's host is declared lost (no VMs) and an operator forgets it: its leases go."""
    with md.engine.begin() as c:
        c.execute(models.hosts.update().where(models.hosts.c.host_id == md.host_id)
                  .values(heartbeat_at=time.time() - 3600))  # fmt: skip
    sched = Scheduler(md.engine)
    sched.sweep_lost_hosts()
    sched.forget_host(md.host_id)
    sched.close()
    assert md.ips.leased(pooled=True) == {}


def test_spares_of_a_forgotten_host_are_removed_when_it_comes_back(
    make_metald: MetaldFactory,
) -> None:
    # still running when forgotten: its next heartbeat drops the ready spares (their slots
    # are free again) and the pool refills with new leases
    md = make_metald("sandbox", name="h1", netns_pool=1)
    assert md.netns_pool is not None and md.netns_pool.wait_full(timeout=20)
    (old,) = md.ips.leased(pooled=True)
    _forget(md)
    md.heartbeat()
    assert not _iface_exists(iface_name(old))
    assert not Path(f"/run/netns/{netns_name(old)}").exists()
    assert md.netns_pool.wait_full(timeout=20)
    (new,) = md.ips.leased(pooled=True)
    assert new != old and _iface_exists(iface_name(new))
    md.close()

    # died with a spare (no close), forgotten, restarted: the spare is found by its record
    assert md.network is not None
    orphan = NetnsPool(md.network, md.ips, 1, record_dir=md.state_dir / "netns-pool")
    orphan._make_one()
    (pool_id,) = md.ips.leased(pooled=True)
    _forget(md)
    assert _iface_exists(iface_name(pool_id))
    md2 = make_metald("sandbox", name="h1", netns_pool=0)
    assert md2.host_id == md.host_id
    assert not _iface_exists(iface_name(pool_id))
    assert not Path(f"/run/netns/{netns_name(pool_id)}").exists()
    assert not list((md.state_dir / "netns-pool").iterdir())
