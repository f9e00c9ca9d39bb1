"""Three metald hosts, each in its own network namespace, sharing one database: VMs are placed
across them, booted by their host's agent, reachable from their host, and tenants' VMs on one
host cannot reach each other."""

from __future__ import annotations

import hashlib
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
from unkey_deploy.metald.network import netns_name
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

    def start(self, name: str) -> None:
        ns = f"unkt-{self.tag}-{name}"
        sh("ip", "netns", "add", ns)
        self.netns[name] = ns
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # routers forward; metald's nftables rules must still keep tenants apart
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # nsenter (not `ip netns exec`, which gives the agent a private mount namespace where
        # the per-VM netns and overlay mounts it makes would be invisible to this test)
        with open(self.tmp / f"{name}.log", "w") as errlog:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}",
                 sys.executable, "-m", "unkey_deploy.metald.agent",
                 "--database-url", self.url, "--state-dir", str(self.tmp / name),
                 "--host-name", name, "--subnet", self.subnet, "--driver", "sandbox",
                 "--cpus", "4", "--memory-mib", "2048", "--interval", "0.05"],
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
def hosts(tmp_path: Path, subnet: str) -> Iterator[Hosts]:
    h = Hosts(tmp_path, subnet)
    upgrade(make_engine(h.url))
    try:
        for name in ("h1", "h2", "h3"):
            h.start(name)
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
    assert str(tmp_path) not in mounts and "/run/unkey-metald/vm_" not in mounts
    with engine.connect() as c:
        assert c.execute(sa.select(models.ip_leases)).all() == []
    hosts.stop()
    with engine.connect() as c:
        assert c.execute(sa.select(models.hosts)).all() == [], "hosts deregister on shutdown"
    own = Path("/proc/self/cgroup").read_text()
    assert "unkey-metald" not in own
    for hid in name_of:
        tag8 = hashlib.sha1(f"{hid}|{hosts.subnet}".encode(), usedforsecurity=False).hexdigest()[:8]
        assert not Path(f"/sys/fs/cgroup/cpu/unkey-metald-{tag8}").exists()
    engine.dispose()
    assert os.path.exists(tmp_path)
