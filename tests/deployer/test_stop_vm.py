"""Stopping a real deployment: its sandbox VM goes and nothing of it is left, whether it was
running or still deploying (its health check never answering), and ``stop --wait`` reports a
stop's final outcome only (a failed attempt that is retried is waited through).

Everything real, wired as ``unkey dev up`` wires it, in one test process: an image pushed to a
local ``docker-registry``, gatewayd (its own process), builderd's service, the deployer worker
talking to metald through the cluster-wide Scheduler (``desired=deleted``), and one host's
Metald (sandbox driver, reconciler thread) carrying it out. Deploy, the app answers, another
tenant's stop is refused and changes nothing, ``unkey deployments stop --wait``, then: the
deployment is ``stopped``, its VM deleted (row, process, cgroup, netns, jail, mounts, asset
lease), the app no longer answers and the VM is no longer a metering target.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.builder.service import BuildService, OciImageSource
from unkey_deploy.builder.vminit import build_init
from unkey_deploy.core.config import MetaldConfig
from unkey_deploy.core.errors import NotFound
from unkey_deploy.deployer.api import BuiltAsset
from unkey_deploy.deployer.metald_vms import MetaldVms
from unkey_deploy.deployer.service import BuilderBuilds
from unkey_deploy.deployer.worker import DeployWorker
from unkey_deploy.metald.api import Metald, Scheduler, Vm, VmState
from unkey_deploy.metald.drivers.base import VmRuntime
from unkey_deploy.metering.billaged import Billaged
from unkey_deploy.metering.codec import MAX_SAMPLES, decode
from unkey_deploy.metering.collector import Collector
from unkey_deploy.metering.service import MeteringLoop
from unkey_deploy.store import jobs
from unkey_deploy.store.db import make_engine, session_factory
from unkey_deploy.testing import images as im
from unkey_deploy.testing.gateway import RunningGateway, new_customer, run_unkey, running_gateway
from unkey_deploy.testing.registry import start_registry
from unkey_deploy.testing.subnets import reserved_subnet

pytestmark = pytest.mark.root  # layers applied with their owners; VM netns, cgroups


@dataclass
class Platform:
    gateway: RunningGateway
    image: str
    metald: Metald  # the host's agent (a test may replace it: a restarted metald)
    scheduler: Scheduler
    assets: AssetManager
    vms: MetaldVms  # the deployer's view of metald
    restart_metald: Callable[[], Metald]
    add_worker: Callable[[], DeployWorker]  # another deployer worker (the service runs two)


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    base = im.Layer.of(im.busybox_entries())
    app = im.Layer.of([im.E("app/", "dir"), im.E("app/www/", "dir"),
                       im.E("app/www/index.html", data=im.INDEX_HTML)])  # fmt: skip
    built = im.image([base, app], entrypoint=["/bin/busybox", "httpd", "-f", "-p", "8080",
                     "-h", "/app/www"], env=["PATH=/bin"], ports=["8080/tcp"])  # fmt: skip
    with (
        start_registry(tmp_path / "registry") as reg,
        running_gateway(tmp_path / "gw") as gw,
        reserved_subnet() as subnet,
    ):
        im.push(reg.host, "acme/stop", "v1", built)
        engine = make_engine(gw.database_url)  # gatewayd migrated it (every service's branch)
        factory = session_factory(engine)
        assets = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
        builder = BuildService(
            factory, assets, OciImageSource(), work_dir=tmp_path / "work",
            init_binary=build_init(tmp_path / "native"), poll_s=0.05,
        )  # fmt: skip
        cfg = MetaldConfig(driver="sandbox", host_name="h1", subnet=subnet, stop_timeout_s=0.5)
        scheduler = Scheduler(engine, leases=assets)

        def rootfs_for(asset: BuiltAsset) -> Path:
            return assets.local_path(asset.asset_id)  # type: ignore[arg-type]

        vms = MetaldVms(scheduler, rootfs_for)
        workers: list[DeployWorker] = []

        def add_worker() -> DeployWorker:
            w = DeployWorker(factory, BuilderBuilds(builder), vms, poll_s=0.05,
                             worker_id=f"test-stop-vm-{len(workers)}")  # fmt: skip
            workers.append(w)
            w.start()
            return w

        def restart_metald() -> Metald:
            """metald (re)started on the host: it recovers the running VMs and reconciles."""
            md = Metald(cfg, engine, tmp_path / "metald", leases=assets)
            md.start(interval=0.1)
            return md

        builder.start(1)
        add_worker()
        p = Platform(gw, reg.ref("acme/stop", "v1"), restart_metald(), scheduler, assets, vms,
                     restart_metald, add_worker)  # fmt: skip
        try:
            yield p
        finally:
            for w in workers:
                w.stop()
            builder.stop()
            p.metald.shutdown()
            scheduler.close()
            engine.dispose()


def _mounts_under(path: Path) -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(path))]  # fmt: skip


@pytest.mark.timeout(240)
def test_stop_wait_deletes_the_vm_and_leaves_nothing(platform: Platform, tmp_path: Path) -> None:
    owner, other = new_customer(platform.gateway), new_customer(platform.gateway)
    spec = {"name": "stop-me", "image": platform.image, "port": 8080,
            "resources": {"cpu": 1, "memory": "128MiB"}}  # fmt: skip
    with platform.gateway.client(owner.key) as client:
        dep_id = client.deploy(spec)["deployment"]["id"]
        end = list(client.events(dep_id))[-1]  # the stream ends with "end" once it runs
        assert end.event == "end"
        assert end.data["state"] == "running", end.data
        dep = client.get_deployment(dep_id)["deployment"]
    url = dep["url"]
    assert httpx.get(url + "/", timeout=10).content == im.INDEX_HTML

    (vm,) = platform.scheduler.list(deployment_id=dep_id)
    assert vm.state == VmState.RUNNING and vm.asset_id == dep["asset_id"]
    md = platform.metald
    rt = VmRuntime.from_json(md._row(vm.vm_id).runtime)
    cgroups = md.cgroups.paths_for(vm.vm_id)
    cgroup_dirs, pids = cgroups.dirs(), cgroups.pids()
    netns = vm.net.netns if vm.net else None
    iface = vm.net.host_iface if vm.net else None
    jail = md.jails.path(vm.vm_id)
    assert Path(f"/proc/{rt.pid}").exists() and pids and cgroup_dirs and jail.is_dir()
    assert netns and Path(f"/run/netns/{netns}").exists()
    assert vm.vm_id in {t.key.vm_id for t in md.meter_targets()}
    # the host's metering loop, as hostd wires it (no bus: batches stay in the spool); batches
    # far larger than this test samples, so only the stop can flush one
    billaged = Billaged(tmp_path / "billaged", batch_samples=MAX_SAMPLES, journal=False)
    metering = MeteringLoop(Collector(), billaged, md.meter_targets, targets_every=1)
    sampled = sum(metering.tick() for _ in range(5))
    assert sampled == 5 and billaged.spool.pending(10) == []
    assert [lease.holder for lease in platform.assets.leases(vm.asset_id)] == [vm.vm_id]

    # another tenant: not found (exit 4), and the VM keeps serving
    refused = run_unkey(platform.gateway, "deployments", "stop", dep_id, api_key=other.key)
    assert refused.code == 4 and "not found" in refused.err, refused
    assert platform.scheduler.get(vm.vm_id).desired == "running"
    assert httpx.get(url + "/", timeout=10).status_code == 200

    stopped = run_unkey(
        platform.gateway, "deployments", "stop", dep_id, "--wait", api_key=owner.key
    )
    assert stopped.code == 0, stopped
    assert stopped.out.strip() == "stopped"
    # progress on stderr: the stop, the VM, the end; not the deploy before it
    assert f"deployment {dep_id} is stopping" in stopped.err
    assert (
        f"deleting {vm.vm_id}" in stopped.err and f"{vm.vm_id} stopped and deleted" in stopped.err
    )
    assert f"deployment {dep_id} is stopped" in stopped.err
    assert "building" not in stopped.err, stopped.err

    with platform.gateway.client(owner.key) as client:
        assert client.get_deployment(dep_id)["deployment"]["state"] == "stopped"
        phases = [(e.event, e.data.get("message")) for e in client.events(dep_id, follow=False)]
    after = phases[[p for p, _ in phases].index("stop") :]
    assert [m for p, m in after if p == "state"] == ["state: stopping", "state: stopped"]
    assert after[-2] == ("done", "deployment stopped (1 VMs deleted)")

    # the VM is deleted: no row, nothing on the host, no lease, not metered, no answer
    assert platform.scheduler.list(deployment_id=dep_id) == []
    with pytest.raises(NotFound):
        platform.scheduler.get(vm.vm_id)
    for pid in [rt.pid, *pids]:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} is still there"
    assert not any(d.exists() for d in cgroup_dirs), "cgroup left behind"
    assert not Path(f"/run/netns/{netns}").exists(), "netns left behind"
    if iface:
        assert not Path(f"/sys/class/net/{iface}").exists(), "interface left behind"
    assert not jail.exists(), "jail left behind"
    assert _mounts_under(md.state_dir) == [], "mount left behind"
    base = rt.extra.get("base")
    if base:
        assert _mounts_under(Path(base)) == [] and not Path(base).exists()
    assert platform.assets.leases(vm.asset_id) == []
    assert vm.vm_id not in {t.key.vm_id for t in md.meter_targets()}
    # metering stopped with it: the next sweep samples nothing and flushes the VM's partial
    # batch (every sample taken while it ran), the series closed
    assert metering.tick() == 0 and metering.tick() == 0
    ((_, _, batch),) = billaged.spool.pending(10)
    assert batch.samples == sampled and batch.customer_id == owner.id
    assert decode(batch.data).key.vm_id == vm.vm_id
    assert billaged.series_count == 0
    metering.collector.close()
    billaged.spool.close()
    # the app no longer answers. Either nothing does, or (on a machine whose default route
    # goes through an intercepting proxy, like this one's) something that is not the app
    try:
        gone = httpx.get(url + "/", timeout=2)
    except httpx.HTTPError:
        pass
    else:
        assert gone.status_code != 200 and gone.content != im.INDEX_HTML, gone.headers

    # stopping again: the same answer, nothing new
    again = run_unkey(platform.gateway, "deployments", "stop", dep_id, "--wait", api_key=owner.key)
    assert again.code == 0 and again.out.strip() == "stopped", again


def _deploy_running(platform: Platform, key: str) -> tuple[str, str]:
    spec = {"name": "stop-me", "image": platform.image, "port": 8080,
            "resources": {"cpu": 1, "memory": "128MiB"}}  # fmt: skip
    with platform.gateway.client(key) as client:
        dep_id = client.deploy(spec)["deployment"]["id"]
        end = list(client.events(dep_id))[-1]
        assert end.event == "end" and end.data["state"] == "running", end.data
        url = client.get_deployment(dep_id)["deployment"]["url"]
    return dep_id, url


def _state_events(platform: Platform, key: str, dep_id: str) -> list[str]:
    with platform.gateway.client(key) as client:
        return [e.data["data"]["state"] for e in client.events(dep_id, follow=False)
                if e.event == "state"]  # fmt: skip


@pytest.mark.timeout(240)
def test_a_stop_attempt_that_times_out_is_retried_while_the_deployment_stays_stopping(
    platform: Platform,
) -> None:
    """metald is down while the stop waits: the attempt fails (an event naming the VM says it
    is retried), the deployment stays ``stopping``, and the retry (metald back) finishes it."""
    owner = new_customer(platform.gateway)
    dep_id, url = _deploy_running(platform, owner.key)
    (vm,) = platform.scheduler.list(deployment_id=dep_id)
    platform.metald.close()  # the host's metald stops; its VMs keep running
    platform.vms.stop_timeout_s = 1.0
    with platform.gateway.client(owner.key) as client:
        assert client.stop_deployment(dep_id)["deployment"]["state"] == "stopping"
        deadline = time.monotonic() + 60
        while not any(e.event == "stop" and "retrying" in e.data["message"]
                      for e in client.events(dep_id, follow=False)):  # fmt: skip
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dep = client.get_deployment(dep_id)["deployment"]
    platform.vms.stop_timeout_s = 60.0  # for the retry, a second after the failure
    assert dep["state"] == "stopping", dep
    assert platform.scheduler.get(vm.vm_id).desired == "deleted"
    assert httpx.get(url + "/", timeout=10).status_code == 200  # nobody stopped it yet

    platform.metald = platform.restart_metald()
    with platform.gateway.client(owner.key) as client:
        deadline = time.monotonic() + 90
        while (dep := client.get_deployment(dep_id)["deployment"])["state"] != "stopped":
            assert time.monotonic() < deadline, dep
            time.sleep(0.1)
        events = [(e.event, e.data.get("message", "")) for e in client.events(dep_id)]
    assert platform.scheduler.list(deployment_id=dep_id) == []
    states = _state_events(platform, owner.key, dep_id)
    assert states[-3:] == ["running", "stopping", "stopped"], states  # never failed
    (retried,) = [m for p, m in events if p == "stop" and "retrying" in m]
    assert retried.startswith("stop attempt 1/3 failed: VMs of deployment"), retried
    assert vm.vm_id in retried and retried.endswith("retrying in 1 s")
    assert ("vm", f"deleting {vm.vm_id} (running on host {vm.host_id})") in events
    # the restarted metald may delete the VM before or during the retry
    assert events[-2] in {("done", "deployment stopped (1 VMs deleted)"),
                          ("done", "deployment stopped (no VMs left)")}, events  # fmt: skip


@pytest.mark.timeout(240)
def test_stop_wait_reports_a_stop_that_fails_for_good_only_after_its_last_attempt(
    platform: Platform,
) -> None:
    """metald stays down: each of the stop job's three attempts times out. ``stop --wait``
    shows the two retries and fails (exit 8, the error naming the VM) only after the last one:
    the deployment reads ``stopping`` until then, ``failed`` once, at the end. Stopping again,
    metald back, finishes it."""
    owner = new_customer(platform.gateway)
    dep_id, _url = _deploy_running(platform, owner.key)
    (vm,) = platform.scheduler.list(deployment_id=dep_id)
    platform.metald.close()
    platform.vms.stop_timeout_s = 0.3
    t0 = time.monotonic()
    out = run_unkey(platform.gateway, "deployments", "stop", dep_id, "--wait", api_key=owner.key)
    waited = time.monotonic() - t0
    assert out.code == 8, out  # deadline_exceeded
    assert f"VMs of deployment {dep_id} still not deleted" in out.err and vm.vm_id in out.err
    assert out.err.count("retrying in") == 2, out.err
    assert "stop attempt 2/3 failed" in out.err and "stop failed:" in out.err
    assert waited > 3.0, waited  # two back-offs (1 s, 2 s) waited through, not reported
    states = _state_events(platform, owner.key, dep_id)
    assert states[-3:] == ["running", "stopping", "failed"], states
    with platform.gateway.client(owner.key) as client:
        dep = client.get_deployment(dep_id)["deployment"]
    assert dep["state"] == "failed" and dep["error"]["code"] == "deadline_exceeded"

    platform.metald = platform.restart_metald()
    platform.vms.stop_timeout_s = 60.0
    again = run_unkey(platform.gateway, "deployments", "stop", dep_id, "--wait", api_key=owner.key)
    assert again.code == 0 and again.out.strip() == "stopped", again
    assert platform.scheduler.list(deployment_id=dep_id) == []


@dataclass
class Footprint:
    """What a VM holds on its host, to check that none of it is left."""

    vm: Vm
    pid: int
    pids: list[int]
    cgroup_dirs: list[Path]
    netns: str
    iface: str | None
    jail: Path
    state_dir: Path
    base: str | None = None

    @classmethod
    def of(cls, md: Metald, vm: Vm) -> Footprint:
        rt = VmRuntime.from_json(md._row(vm.vm_id).runtime)
        cgroups = md.cgroups.paths_for(vm.vm_id)
        assert vm.net is not None and vm.net.netns
        return cls(vm, rt.pid, list(cgroups.pids()), list(cgroups.dirs()), vm.net.netns,
                   vm.net.host_iface, md.jails.path(vm.vm_id), md.state_dir,
                   rt.extra.get("base"))  # fmt: skip

    def assert_present(self) -> None:
        assert Path(f"/proc/{self.pid}").exists() and self.pids and self.cgroup_dirs
        assert self.jail.is_dir() and Path(f"/run/netns/{self.netns}").exists()

    def assert_gone(self) -> None:
        for pid in [self.pid, *self.pids]:
            assert not Path(f"/proc/{pid}").exists(), f"process {pid} is still there"
        assert not any(d.exists() for d in self.cgroup_dirs), "cgroup left behind"
        assert not Path(f"/run/netns/{self.netns}").exists(), "netns left behind"
        if self.iface:
            assert not Path(f"/sys/class/net/{self.iface}").exists(), "interface left behind"
        assert not self.jail.exists(), "jail left behind"
        assert _mounts_under(self.state_dir / "jails" / self.vm.vm_id) == []
        assert [m for m in _mounts_under(self.state_dir) if self.vm.vm_id in m] == []
        if self.base:
            assert _mounts_under(Path(self.base)) == [] and not Path(self.base).exists()


@pytest.mark.timeout(240)
def test_stop_while_deploying_interrupts_the_health_wait_and_leaves_nothing(
    platform: Platform,
) -> None:
    """An app whose health check never answers (it sleeps instead of serving): its deploy
    waits in ``deploying`` with the VM booted. ``stop --wait`` then: the deploy job's worker
    notices the cancel, deletes the VM (its launch stops waiting), acknowledges the cancel; the
    stop job, claimed meanwhile by the second worker, waited for it and records ``stopped``.
    Nothing of the VM is left: no row, process, cgroup, netns, interface, jail, mount, asset
    lease or capacity; nothing was recorded failed."""
    platform.add_worker()  # the stop job is claimed while the deploy job still runs
    owner, other = new_customer(platform.gateway), new_customer(platform.gateway)
    spec = {"name": "never-ready", "image": platform.image, "port": 8080,
            "command": ["/bin/busybox", "sleep", "600"],
            "resources": {"cpu": 1, "memory": "128MiB"}}  # fmt: skip
    with platform.gateway.client(owner.key) as client:
        dep_id = client.deploy(spec)["deployment"]["id"]
        deadline = time.monotonic() + 120
        while not any(e.event == "health" for e in client.events(dep_id, follow=False)):
            assert time.monotonic() < deadline, client.get_deployment(dep_id)
            time.sleep(0.05)
        assert client.get_deployment(dep_id)["deployment"]["state"] == "deploying"
    (vm,) = platform.scheduler.list(deployment_id=dep_id)
    deadline = time.monotonic() + 30
    while vm.state != VmState.BOOTING:  # the host started it; its app never answers
        assert time.monotonic() < deadline and vm.state in (VmState.PENDING, VmState.PREPARING)
        time.sleep(0.02)
        vm = platform.scheduler.get(vm.vm_id)
    footprint = Footprint.of(platform.metald, vm)
    footprint.assert_present()
    assert [lease.holder for lease in platform.assets.leases(vm.asset_id)] == [vm.vm_id]
    (host,) = [h for h in platform.scheduler.host_views() if h.host_id == vm.host_id]
    assert host.used_cpus == 1 and host.used_memory_bytes == 128 << 20

    refused = run_unkey(platform.gateway, "deployments", "stop", dep_id, api_key=other.key)
    assert refused.code == 4 and "not found" in refused.err, refused
    assert platform.scheduler.get(vm.vm_id).state == VmState.BOOTING

    stopped = run_unkey(platform.gateway, "deployments", "stop", dep_id, "--wait",
                        api_key=owner.key)  # fmt: skip
    assert stopped.code == 0, stopped
    assert stopped.out.strip() == "stopped"
    assert f"deployment {dep_id} is stopping" in stopped.err
    assert "deploy interrupted" in stopped.err, stopped.err
    assert f"deleting {vm.vm_id}: the deploy is interrupted" in stopped.err
    assert f"deployment {dep_id} is stopped" in stopped.err

    with platform.gateway.client(owner.key) as client:
        events = list(client.events(dep_id, follow=False))
    states = [e.data["data"]["state"] for e in events if e.event == "state"]
    assert states == ["building", "deploying", "stopping", "stopped"], states
    assert "failed" not in [e.event for e in events]
    with session_factory(make_engine(platform.gateway.database_url))() as s:
        (deploy_job,) = [j for j in jobs.list_jobs(s, "deploy")
                         if j.payload["deployment_id"] == dep_id]  # fmt: skip
        (stop_job,) = [j for j in jobs.list_jobs(s, "stop")
                       if j.payload["deployment_id"] == dep_id]  # fmt: skip
    assert deploy_job.state == jobs.JobState.CANCELLED
    assert stop_job.state == jobs.JobState.SUCCEEDED

    assert platform.scheduler.list(deployment_id=dep_id) == []
    footprint.assert_gone()
    assert platform.assets.leases(vm.asset_id) == []
    (host,) = [h for h in platform.scheduler.host_views() if h.host_id == vm.host_id]
    assert host.used_cpus == 0 and host.used_memory_bytes == 0
    assert vm.vm_id not in {t.key.vm_id for t in platform.metald.meter_targets()}
    again = run_unkey(platform.gateway, "deployments", "stop", dep_id, "--wait", api_key=owner.key)
    assert again.code == 0 and again.out.strip() == "stopped", again
