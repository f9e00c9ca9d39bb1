"""Three metald hosts, each in its own network namespace, sharing one database: VMs are placed
across them, booted by their host's agent, reachable from their host, and tenants' VMs on one
host cannot reach each other."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from unkey_deploy.metald import models
from unkey_deploy.metald.api import CreateVm, Scheduler, VmState
from unkey_deploy.metald.network import POOL_PREFIX, netns_name
from unkey_deploy.store.db import make_engine, upgrade

pytestmark = pytest.mark.root


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=30)


_GET = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode(), end="")
except OSError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
"""


def fetch(netns: str, url: str, timeout: int = 2) -> str | None:
    """GET ``url`` from inside ``netns``; None when it cannot connect."""
    p = sh("ip", "netns", "exec", netns, sys.executable, "-c", _GET, url, str(timeout),
           check=False)  # fmt: skip
    if p.returncode != 0 and "network namespace" in p.stderr:
        raise AssertionError(p.stderr)
    return p.stdout if p.returncode == 0 else None


class Hosts:
    def __init__(self, tmp: Path, subnet: str) -> None:
        self.tmp, self.subnet = tmp, subnet
        self.tag = secrets.token_hex(3)
        self.url = f"sqlite:///{tmp / 'cluster.db'}"
        self.netns: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, *extra: str) -> None:
        ns = f"unkt-{self.tag}-{name}"
        if name not in self.netns:
            sh("ip", "netns", "add", ns)
            self.netns[name] = ns
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # routers forward; metald's nftables rules must still keep tenants apart
            sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # nsenter (not `ip netns exec`, which gives the agent a private mount namespace where
        # the per-VM netns and overlay mounts it makes would be invisible to this test)
        old = self.procs.pop(name, None)
        if old is not None and old.stdout:
            old.stdout.close()
        with open(self.tmp / f"{name}.log", "a") as errlog:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}",
                 sys.executable, "-m", "unkey_deploy.metald.agent",
                 "--database-url", self.url, "--state-dir", str(self.tmp / name),
                 "--host-name", name, "--subnet", self.subnet, "--driver", "sandbox",
                 "--cpus", "4", "--memory-mib", "2048", "--interval", "0.05", *extra],
                stdout=subprocess.PIPE, stderr=errlog, text=True,
            )  # fmt: skip
        self.procs[name] = proc
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("READY"), (self.tmp / f"{name}.log").read_text()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        for ns in self.netns.values():
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def agent_args() -> tuple[str, ...]:
    """Extra agent arguments (``{name}``/``{tmp}`` filled in); a test overrides it with
    ``@pytest.mark.parametrize("agent_args", ...)``."""
    return ()


@pytest.fixture
def hosts(tmp_path: Path, subnet: str, agent_args: tuple[str, ...]) -> Iterator[Hosts]:
    h = Hosts(tmp_path, subnet)
    upgrade(make_engine(h.url))
    try:
        for name in ("h1", "h2", "h3"):
            h.start(name, *(a.format(name=name, tmp=tmp_path) for a in agent_args))
        yield h
    finally:
        h.stop()


def test_three_hosts_place_boot_isolate_and_clean_up(hosts: Hosts, tmp_path: Path) -> None:
    from unkey_deploy.testing.rootfs import build_test_rootfs

    rootfs = build_test_rootfs(tmp_path / "img" / "rootfs.ext4")
    engine = make_engine(hosts.url)
    sched = Scheduler(engine)
    with engine.connect() as c:
        host_rows = {r.name: r for r in c.execute(sa.select(models.hosts))}
    assert set(host_rows) == {"h1", "h2", "h3"}
    assert all(r.driver == "sandbox" and r.cpus == 4 for r in host_rows.values())
    name_of = {r.host_id: n for n, r in host_rows.items()}
    report = sched.hosts()
    assert [h["name"] for h in report] == ["h1", "h2", "h3"]
    assert all(h["schedulable"] and h["drivers"]["sandbox"]["available"] for h in report)

    web = [sched.create_vm(CreateVm("dep_web", "cust_a", rootfs, memory_bytes=64 << 20))
           for _ in range(3)]  # fmt: skip
    assert sorted(name_of[v.host_id] for v in web) == ["h1", "h2", "h3"], "replicas spread"
    for v in web:
        sched.boot(v.vm_id)
    for v in web:
        vm = sched.wait_ready(v.vm_id, timeout=60)
        assert vm.state == VmState.RUNNING, vm.error
        assert vm.url is not None
        # reachable from its own host's namespace...
        assert fetch(hosts.netns[name_of[vm.host_id]], vm.url + "/") == "unkey-test-app\n"

    # another tenant's VM
    other = sched.create_vm(CreateVm("dep_other", "cust_b", rootfs, memory_bytes=64 << 20))
    sched.boot(other.vm_id)
    other = sched.wait_state(other.vm_id, {VmState.RUNNING, VmState.FAILED}, timeout=60)
    assert other.state == VmState.RUNNING, other.error
    host_ns = hosts.netns[name_of[other.host_id]]
    neighbour = next(sched.get(v.vm_id) for v in web if v.host_id == other.host_id)
    assert neighbour.url is not None
    # the host reaches both, but the other tenant's VM cannot reach its neighbour
    assert fetch(host_ns, neighbour.url + "/") == "unkey-test-app\n"
    assert fetch(netns_name(other.vm_id), neighbour.url + "/") is None
    # control: without metald's nftables table the host would forward between them
    tag = hashlib.sha1(f"{other.host_id}|{hosts.subnet}".encode(), usedforsecurity=False)
    table = f"unkey_{tag.hexdigest()[:8]}"
    assert table in sh("ip", "netns", "exec", host_ns, "nft", "list", "tables").stdout
    sh("ip", "netns", "exec", host_ns, "nft", "delete", "table", "inet", table)
    assert fetch(netns_name(other.vm_id), neighbour.url + "/") == "unkey-test-app\n"

    # delete everything through the scheduler; each host's agent cleans up its own VMs
    all_vms = [*web, other]
    for v in all_vms:
        sched.delete(v.vm_id)
    deadline = time.monotonic() + 30
    while sched.list() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched.list() == []
    for v in all_vms:
        assert not Path(f"/run/netns/{netns_name(v.vm_id)}").exists()
        assert not Path(f"/run/unkey-metald/{v.vm_id}").exists()
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts
    # (other tests' VMs may be mounted under /run/unkey-metald right now: only ours count)
    assert not [v.vm_id for v in all_vms if f"/run/unkey-metald/{v.vm_id}/" in mounts]
    with engine.connect() as c:
        leases = c.execute(sa.select(models.ip_leases)).all()
    # what is left are the hosts' ready spares (metald.netns_pool), no VM's
    assert [r for r in leases if not r.vm_id.startswith(POOL_PREFIX)] == []
    hosts.stop()
    with engine.connect() as c:
        assert c.execute(sa.select(models.hosts)).all() == [], "hosts deregister on shutdown"
        assert c.execute(sa.select(models.ip_leases)).all() == [], "spares go with their host"
    own = Path("/proc/self/cgroup").read_text()
    assert "unkey-metald" not in own
    for hid in name_of:
        tag8 = hashlib.sha1(f"{hid}|{hosts.subnet}".encode(), usedforsecurity=False).hexdigest()[:8]
        assert not Path(f"/sys/fs/cgroup/cpu/unkey-metald-{tag8}").exists()
    engine.dispose()
    assert os.path.exists(tmp_path)


def samples(path: Path) -> list[tuple[float, str, str, int]]:
    """The agent's metering lines: (unix time, vm_id, instance_id, cpu_ns)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:  # the last line may be half written
            out.append((float(parts[0]), parts[1], parts[2], int(parts[3])))
    return out


def power_cut(hosts: Hosts, name: str, host_id: str, subnet: str) -> None:
    """Take host ``name`` away at once: its agent and every VM process it runs die (SIGKILL),
    nothing of theirs is cleaned up."""
    proc = hosts.procs[name]
    proc.kill()
    proc.wait()
    tag = hashlib.sha1(f"{host_id}|{subnet}".encode(), usedforsecurity=False).hexdigest()[:8]
    for _ in range(20):
        pids = {
            int(p)
            for f in Path("/sys/fs/cgroup").glob(f"*/unkey-metald-{tag}/*/cgroup.procs")
            for p in f.read_text().split()
        }
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"VM processes of {name} survived SIGKILL: {pids}")


LOST_AFTER = 4.0


@pytest.mark.parametrize(
    "agent_args",
    [("--lost-after", str(LOST_AFTER), "--meter-file", "{tmp}/{name}.samples")],
)
def test_host_lost_mid_run_its_vms_are_replaced_and_metering_of_others_continues(
    hosts: Hosts, tmp_path: Path, agent_args: tuple[str, ...]
) -> None:
    from unkey_deploy.testing.rootfs import build_test_rootfs

    rootfs = build_test_rootfs(tmp_path / "img" / "rootfs.ext4")
    engine = make_engine(hosts.url)
    sched = Scheduler(engine, lost_after_s=LOST_AFTER)
    with engine.connect() as c:
        id_of = {r.name: r.host_id for r in c.execute(sa.select(models.hosts))}
    name_of = {v: k for k, v in id_of.items()}
    web = [sched.create_vm(CreateVm("dep_web", "cust_a", rootfs, memory_bytes=64 << 20))
           for _ in range(3)]  # fmt: skip
    assert sorted(name_of[v.host_id] for v in web) == ["h1", "h2", "h3"]
    for v in web:
        sched.boot(v.vm_id)
    web = [sched.wait_ready(v.vm_id, timeout=60) for v in web]
    doomed = next(v for v in web if name_of[v.host_id] == "h3")
    survivors = [v for v in web if v is not doomed]

    def series(vm_id: str, instance_id: str | None) -> list[tuple[float, str, str, int]]:
        return [
            s for n in ("h1", "h2", "h3") for s in samples(tmp_path / f"{n}.samples")
            if s[1] == vm_id and s[2] == instance_id
        ]  # fmt: skip

    deadline = time.monotonic() + 20
    while not all(series(v.vm_id, v.instance_id) for v in web):
        assert time.monotonic() < deadline, "no samples for every VM before the loss"
        time.sleep(0.2)

    # take h3 away mid-run
    power_cut(hosts, "h3", id_of["h3"], hosts.subnet)
    cut = time.time()
    lost = sched.wait_state(doomed.vm_id, {VmState.LOST}, timeout=30)
    assert "h3" in (lost.error or "") and "stopped heartbeating" in (lost.error or "")
    assert time.time() - cut >= LOST_AFTER - 1.0, "declared lost before its heartbeat aged"
    report = {h["name"]: h for h in sched.hosts()}
    assert report["h3"]["lost_at"] is not None and not report["h3"]["schedulable"]
    assert report["h1"]["schedulable"] and report["h2"]["schedulable"]
    for v in survivors:
        assert sched.get(v.vm_id).state == VmState.RUNNING, "only h3's VMs are lost"

    # it is rescheduled: a new VM (and instance) on a live host, answering HTTP there
    deadline = time.monotonic() + 30
    while sched.get(doomed.vm_id).replaced_by is None:
        assert time.monotonic() < deadline, "the lost VM was not replaced"
        time.sleep(0.1)
    new = sched.wait_ready(sched.current(doomed.vm_id).vm_id, timeout=60)
    assert name_of[new.host_id] in ("h1", "h2")
    assert new.vm_id != doomed.vm_id and new.instance_id not in (None, doomed.instance_id)
    assert (new.deployment_id, new.customer_id) == ("dep_web", "cust_a")
    assert new.url is not None
    assert fetch(hosts.netns[name_of[new.host_id]], new.url + "/") == "unkey-test-app\n"

    # metering: the replacement is a new series; the survivors' series never stopped
    deadline = time.monotonic() + 20
    while not series(new.vm_id, new.instance_id):
        assert time.monotonic() < deadline, "the replacement is not metered"
        time.sleep(0.2)
    now = time.time()
    for v in survivors:
        got = series(v.vm_id, v.instance_id)
        after = [s for s in got if s[0] > cut]
        # 10 Hz, so ~10 per second since the cut; allow for a loaded machine
        assert len(after) >= 3 * (now - cut), (v.vm_id, len(after), now - cut)
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(after)]
        assert max(gaps) < 2.0, f"metering of {v.vm_id} paused {max(gaps):.1f} s"
        assert [s[3] for s in got] == sorted(s[3] for s in got), "CPU counter went back"
    assert not [s for s in series(doomed.vm_id, doomed.instance_id) if s[0] > cut + 0.5]

    # h3 comes back: it frees and forgets the lost VM, and takes VMs again
    hosts.start("h3", *(a.format(name="h3", tmp=tmp_path) for a in agent_args))
    deadline = time.monotonic() + 30
    while doomed.vm_id in {v.vm_id for v in sched.list()}:
        assert time.monotonic() < deadline, "the returning host kept its lost VM"
        time.sleep(0.1)
    assert not Path(f"/run/netns/{netns_name(doomed.vm_id)}").exists()
    assert not Path(f"/run/unkey-metald/{doomed.vm_id}").exists()
    assert {h["name"]: h for h in sched.hosts()}["h3"]["schedulable"]

    for v in sched.list():
        sched.delete(v.vm_id)
    deadline = time.monotonic() + 30
    while sched.list() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched.list() == []
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts
    sched.close()
    engine.dispose()
