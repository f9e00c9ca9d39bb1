"""Cluster scheduling without booting anything: concurrent placement never overcommits a host
(SQLite and PostgreSQL), a host whose heartbeat stops is declared lost, its VMs ``lost``
and replaced on live hosts within their capacity, and a lost host can be forgotten."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import zstandard
from sqlalchemy import Engine

from unkey_deploy.assets.api import AssetMeta
from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.core.clock import FakeClock
from unkey_deploy.core.errors import (
    Conflict,
    IllegalTransition,
    NotFound,
    ResourceExhausted,
    VmError,
)
from unkey_deploy.core.ids import BuildId, CustomerId
from unkey_deploy.metald import models, service
from unkey_deploy.metald.api import CreateVm, Scheduler, VmState
from unkey_deploy.metald.network import IpAllocator
from unkey_deploy.store.db import make_engine, session_factory, upgrade

MIB = 1 << 20


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cluster_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A control-plane database of our own (on PostgreSQL: a fresh database, since placement
    reads every host of the table and other tests share the server's default one)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cluster.db'}"
        return
    server = request.getfixturevalue("postgres_url")
    name = f"metald_{secrets.token_hex(4)}"
    admin = make_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


def add_host(engine: Engine, name: str, *, cpus: int, memory_mib: int, at: float) -> str:
    host_id = f"host_{name}{secrets.token_hex(4)}"
    with engine.begin() as c:
        c.execute(
            models.hosts.insert().values(
                host_id=host_id, name=name, driver="sandbox", cpus=cpus,
                memory_bytes=memory_mib * MIB, capabilities={}, schedulable=True,
                registered_at=at, heartbeat_at=at,
            )
        )  # fmt: skip
    return host_id


def beat(engine: Engine, host_id: str, at: float) -> None:
    with engine.begin() as c:
        c.execute(
            models.hosts.update().where(models.hosts.c.host_id == host_id).values(heartbeat_at=at)
        )


def test_concurrent_schedulers_never_overcommit_a_host(
    cluster_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(cluster_url)
    upgrade(engine)
    now = time.time()
    hosts = [add_host(engine, n, cpus=2, memory_mib=1024, at=now) for n in ("a", "b")]
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    # A slow scheduler widens the window between reading capacity and recording the VM: without
    # the hosts lock every thread reads the same free capacity and several pick the same host.
    real_place = service.place

    def slow_place(*a: Any, **kw: Any) -> str:
        time.sleep(0.05)
        return real_place(*a, **kw)

    monkeypatch.setattr(service, "place", slow_place)
    n = 8
    barrier = threading.Barrier(n)
    placed: list[str] = []
    refused: list[Exception] = []
    others: list[BaseException] = []

    def one(i: int) -> None:
        # each thread is its own scheduler process, with its own engine (connections)
        eng = make_engine(cluster_url)
        try:
            sched = Scheduler(eng)
            barrier.wait()
            vm = sched.create_vm(CreateVm(f"dep_{i}", "cust_a", rootfs, memory_bytes=64 * MIB))
            placed.append(vm.host_id)
        except ResourceExhausted as exc:
            refused.append(exc)
        except BaseException as exc:
            others.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert others == []
    # 2 hosts x 2 vCPUs: exactly four one-vCPU VMs fit, the other four are refused
    assert sorted(placed) == sorted(hosts * 2), placed
    assert len(refused) == 4
    assert "no host can fit 1 vCPU" in str(refused[0])
    with engine.connect() as c:
        per_host = dict(
            c.execute(
                sa.select(models.vms.c.host_id, sa.func.sum(models.vms.c.vcpus)).group_by(
                    models.vms.c.host_id
                )
            ).all()
        )
    assert per_host == dict.fromkeys(hosts, 2)
    engine.dispose()


def test_stale_host_is_lost_its_vms_replaced_within_capacity(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cluster.db'}")
    upgrade(engine)
    clock = FakeClock()
    sched = Scheduler(engine, clock=clock, lost_after_s=5.0)
    t0 = clock.now().timestamp()
    a = add_host(engine, "a", cpus=2, memory_mib=1024, at=t0)
    b = add_host(engine, "b", cpus=1, memory_mib=1024, at=t0)
    c_ = add_host(engine, "c", cpus=1, memory_mib=1024, at=t0)
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    web = [sched.create_vm(CreateVm("dep_web", "cust_a", rootfs, memory_bytes=64 * MIB,
                                    env={"K": "v"})) for _ in range(3)]  # fmt: skip
    assert sorted(v.host_id for v in web) == sorted([a, b, c_]), "spread"
    on_a = next(v for v in web if v.host_id == a)
    sched.boot(on_a.vm_id)  # wanted running
    extra = sched.create_vm(CreateVm("dep_batch", "cust_b", rootfs, memory_bytes=64 * MIB))
    assert extra.host_id == a  # a is full now (2 vCPUs); extra is wanted stopped
    assert sched.sweep_lost_hosts() == []

    # b and c keep heartbeating, a stops
    clock.advance(4.0)
    beat(engine, b, clock.now().timestamp())
    beat(engine, c_, clock.now().timestamp())
    assert sched.sweep_lost_hosts() == [], "4 s < lost_after_s"
    clock.advance(2.0)
    beat(engine, b, clock.now().timestamp())
    beat(engine, c_, clock.now().timestamp())
    # b and c are full (1 vCPU each): the lost VM cannot be placed yet
    done = sched.sweep_lost_hosts()
    assert done == [(on_a.vm_id, None)]
    lost = sched.get(on_a.vm_id)
    assert lost.state == VmState.LOST and lost.replaced_by is None
    assert "stopped heartbeating 6.0 s ago" in (lost.error or "")
    assert sched.get(extra.vm_id).state == VmState.LOST
    report = {h["host_id"]: h for h in sched.hosts()}
    assert report[a]["lost_at"] is not None and not report[a]["schedulable"]
    with pytest.raises(VmError, match="lost with its host"):
        sched.wait_ready(on_a.vm_id, timeout=1)
    with pytest.raises(IllegalTransition, match="it is lost"):
        sched.boot(on_a.vm_id)

    # room appears on b: the next sweep places the replacement there (wanted running, a new VM)
    neighbour = next(v for v in web if v.host_id == b)
    with engine.begin() as c:
        c.execute(models.vms.delete().where(models.vms.c.vm_id == neighbour.vm_id))
    done = sched.sweep_lost_hosts()
    assert len(done) == 1 and done[0][0] == on_a.vm_id and done[0][1] is not None
    new = sched.get(done[0][1])
    assert new.host_id == b and new.state == VmState.PENDING and new.desired == "running"
    assert (new.deployment_id, new.customer_id, new.vcpus, new.memory_bytes, new.port) == (
        on_a.deployment_id, on_a.customer_id, on_a.vcpus, on_a.memory_bytes, on_a.port
    )  # fmt: skip
    assert new.vm_id != on_a.vm_id and new.instance_id is None
    assert sched.current(on_a.vm_id).vm_id == new.vm_id
    assert sched.get(on_a.vm_id).desired == "deleted", "no longer counts against host a"
    # the stopped VM is lost but not replaced (nobody wanted it running)
    assert sched.get(extra.vm_id).replaced_by is None
    assert sched.sweep_lost_hosts() == [], "nothing twice"
    engine.dispose()


def test_a_lost_host_is_forgotten_its_rows_leases_and_addresses_go(
    cluster_url: str, tmp_path: Path
) -> None:
    engine = make_engine(cluster_url)
    upgrade(engine)
    # grace 0: once nothing holds the asset, delete + gc remove its blob at once
    assets = AssetManager(session_factory(engine), FsBlobStore(tmp_path / "blobs"),
                          tmp_path / "cache", grace_s=0.0)  # fmt: skip
    image = tmp_path / "rootfs.ext4"
    image.write_bytes(b"\0" * 4096)
    zst = tmp_path / "rootfs.ext4.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(image.read_bytes()))
    meta = AssetMeta(CustomerId("cust_a"), "test:1", "sha256:" + "0" * 64, BuildId("bld_x"),
                     "key-forget", 1, 4096, "0" * 64)  # fmt: skip
    asset = assets.register(zst, meta)
    blob = assets.local_path(asset.asset_id)
    clock = FakeClock()
    sched = Scheduler(engine, clock=clock, lost_after_s=5.0, leases=assets)
    t0 = clock.now().timestamp()
    a = add_host(engine, "a", cpus=4, memory_mib=1024, at=t0)
    # on a (the only host): one VM of the asset, wanted stopped, and one wanted running
    on_asset = sched.create_vm(CreateVm("dep_img", "cust_a", blob, memory_bytes=64 * MIB,
                                        asset_id=asset.asset_id))  # fmt: skip
    web = sched.boot(sched.create_vm(CreateVm("dep_web", "cust_a", image,
                                              memory_bytes=64 * MIB)).vm_id)  # fmt: skip
    assert on_asset.host_id == web.host_id == a
    ips = IpAllocator(engine, a, "172.31.250.0/24")
    slots = {ips.lease(on_asset.vm_id), ips.lease(web.vm_id)}
    assert [lease.holder for lease in assets.leases(asset.asset_id)] == [on_asset.vm_id]

    # a live host is never forgotten, nor a late one that was not declared lost yet
    with pytest.raises(Conflict, match=r"host a \(.*\) is live: its last heartbeat is 0\.0 s"):
        sched.forget_host(a)
    clock.advance(6.0)
    with pytest.raises(Conflict, match="late but not lost yet") as late:
        sched.forget_host(a)
    assert late.value.suggestion and "stop its metald" in late.value.suggestion
    # lost, but nowhere to place the running VM's replacement yet: forgetting would drop it
    assert sched.sweep_lost_hosts() == [(web.vm_id, None)]
    with pytest.raises(Conflict, match=f"1 lost VM\\(s\\) still waiting for a replacement: "
                       f"{web.vm_id}"):  # fmt: skip
        sched.forget_host(a)
    assert len(sched.list(host_id=a)) == 2 and set(ips.leased().values()) == slots
    b = add_host(engine, "b", cpus=4, memory_mib=1024, at=clock.now().timestamp())
    ((lost_id, replacement),) = sched.sweep_lost_hosts()
    assert lost_id == web.vm_id and replacement is not None
    report = {h["host_id"]: h for h in sched.hosts()}
    assert report[a]["vms"] == {"lost": 2} and report[b]["vms"] == {"pending": 1}
    # the lost VM's lease still keeps the asset
    with pytest.raises(Conflict, match=f"in use by {on_asset.vm_id}"):
        assets.delete(asset.asset_id)

    forgotten = sched.forget_host(a)
    assert forgotten == {
        "host_id": a, "name": "a", "vms": sorted([on_asset.vm_id, web.vm_id]),
        "asset_leases_released": 1, "ip_leases_released": 2,
    }  # fmt: skip
    assert sched.list(host_id=a) == []
    assert [h["host_id"] for h in sched.hosts()] == [b]
    assert ips.leased() == {}
    assert assets.leases(asset.asset_id) == []
    # nothing holds the asset now: it can be deleted and gc collects its blob
    assets.delete(asset.asset_id)
    assert assets.gc().blobs_deleted == [asset.blob_sha256]
    assert not blob.exists()
    # the live host and the replacement are untouched
    assert [v.vm_id for v in sched.list()] == [replacement]
    # an operator retrying: the host is gone
    with pytest.raises(NotFound, match=f"host {a} not found"):
        sched.forget_host(a)
    with pytest.raises(NotFound):
        sched.forget_host("host_nosuch")
    sched.close()
    engine.dispose()


def test_persisted_transitions_follow_the_state_machine_and_race_safely(
    cluster_url: str, tmp_path: Path
) -> None:
    """The VM's row moves only along the state machine, whoever writes it: of several
    processes moving one VM at once exactly one wins, the others get IllegalTransition."""
    engine = make_engine(cluster_url)
    upgrade(engine)
    add_host(engine, "a", cpus=4, memory_mib=1024, at=time.time())
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    sched = Scheduler(engine)
    vm = sched.create_vm(CreateVm("dep_t", "cust_a", rootfs, memory_bytes=64 * MIB))
    assert vm.state == VmState.PENDING and sched.get(vm.vm_id) == vm  # read back as stored

    with pytest.raises(IllegalTransition, match="cannot go from pending to running"):
        sched._set_state(vm.vm_id, VmState.RUNNING)
    with pytest.raises(NotFound):
        sched._set_state("vm_doesnotexist", VmState.PREPARING)
    moved = sched._set_state(vm.vm_id, VmState.PREPARING, error=None, driver="sandbox")
    assert moved.state == VmState.PREPARING and moved.driver == "sandbox"
    assert sched.get(vm.vm_id) == moved

    n = 6
    barrier = threading.Barrier(n)
    won: list[VmState] = []
    lost: list[Exception] = []

    def one(target: VmState) -> None:
        eng = make_engine(cluster_url)  # each its own process, in effect
        try:
            barrier.wait()
            won.append(Scheduler(eng)._set_state(vm.vm_id, target).state)
        except IllegalTransition as exc:
            lost.append(exc)
        finally:
            eng.dispose()

    # every writer moves it preparing -> booting: only one can (booting -> booting is illegal)
    threads = [threading.Thread(target=one, args=(VmState.BOOTING,)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert won == [VmState.BOOTING] and len(lost) == n - 1, (won, lost)
    assert sched.get(vm.vm_id).state == VmState.BOOTING
    engine.dispose()


def test_host_views_sum_what_each_host_runs(cluster_url: str, tmp_path: Path) -> None:
    """What placement reads, summed by the database: each host's used vCPUs and memory (deleted
    VMs no longer count) and the replicas of each deployment, or of the one being placed."""
    engine = make_engine(cluster_url)
    upgrade(engine)
    now = time.time()
    a = add_host(engine, "a", cpus=16, memory_mib=4096, at=now)
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    sched = Scheduler(engine)
    made = [
        sched.create_vm(CreateVm(dep, "cust_a", rootfs, vcpus=v, memory_bytes=m * MIB))
        for dep, v, m in [("dep_x", 1, 64), ("dep_x", 2, 128), ("dep_y", 4, 256), ("dep_z", 1, 64)]
    ]
    b = add_host(engine, "b", cpus=16, memory_mib=4096, at=now)  # empty: nothing placed yet
    sched.delete(made[3].vm_id)  # dep_z's VM is being deleted: it no longer counts
    views = {v.host_id: v for v in sched.host_views()}
    assert (views[a].used_cpus, views[a].used_memory_bytes) == (7, 448 * MIB)
    assert dict(views[a].replicas) == {"dep_x": 2, "dep_y": 1}
    assert (views[b].used_cpus, views[b].used_memory_bytes, dict(views[b].replicas)) == (0, 0, {})
    with engine.connect() as c:
        one = {v.host_id: v for v in sched._host_views(c, "dep_x")}
    assert (one[a].used_cpus, one[a].used_memory_bytes) == (7, 448 * MIB)
    assert dict(one[a].replicas) == {"dep_x": 2} and dict(one[b].replicas) == {}
    # and placement spreads dep_x's next replica to the host without one
    assert sched.create_vm(CreateVm("dep_x", "cust_a", rootfs, memory_bytes=64 * MIB)).host_id == b
    sched.close()
    engine.dispose()
