"""Guests cannot reach the host's control ports, another tenant's VM, nor the private networks
and cloud metadata address beyond the host; they do reach public addresses through its NAT.

Worst case for the host: its control services (gatewayd, nats-server, the /metrics endpoints)
listen on every interface rather than on 127.0.0.1, so only metald's nftables rules stand
between a guest and them. The host is a metald agent in a network namespace of its own (so
only its rules apply, not those of other metalds on this machine) with stand-in listeners on
those ports; it boots real sandbox VMs of two tenants. From inside the guest's network
namespace (where the guest's processes live) every address of the host, IPv4 and IPv6, is
tried on those ports, and the other tenant's VM on its app port. Beyond the host, two more
namespaces stand for the networks it routes to: a private LAN (10.123.0.0/24, which also holds
the cloud metadata address 169.254.169.254) and the public internet (198.51.100.0/24), each with
a listener. The host itself reaches all of them (they really answer), and with metald's table
removed the guest reaches them too (so the test can fail).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from unkey_deploy.metald import models
from unkey_deploy.metald.api import CreateVm, Scheduler, Vm, VmState
from unkey_deploy.metald.network import netns_name
from unkey_deploy.store.db import make_engine, upgrade
from unkey_deploy.testing.rootfs import build_test_rootfs
from unkey_deploy.testing.subnets import reserved_subnet

pytestmark = pytest.mark.root

SERVICES = ("gatewayd", "nats", "metrics")

_PROBE = """
import json, socket, sys
out = {}
for target in json.loads(sys.argv[1]):
    host, port = target.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((host.strip("[]"), int(port)))
        out[target] = "connected"
    except OSError as exc:
        out[target] = type(exc).__name__
    finally:
        s.close()
print(json.dumps(out))
"""


def probe(targets: list[str], netns: str | None = None) -> dict[str, str]:
    """Try a TCP connection to each ``host:port`` (from ``netns`` if given)."""
    cmd = [sys.executable, "-c", _PROBE, json.dumps(targets)]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    result: dict[str, str] = json.loads(p.stdout)
    return result


_LISTEN = """
import socket, sys, threading
socks = []
for port in sys.argv[1:]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4-mapped too
    s.bind(("::", int(port)))
    s.listen(16)
    socks.append(s)
def serve(s):
    while True:
        s.accept()[0].close()
for s in socks:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("LISTENING", flush=True)
sys.stdin.read()
"""


class Host:
    """A metald host in a network namespace of its own (only its nftables rules apply there),
    with stand-ins for the control services listening on every interface."""

    def __init__(self, tmp: Path, subnet: str) -> None:
        self.tmp, self.subnet = tmp, subnet
        self.ns = f"unkg-{secrets.token_hex(3)}"
        self.url = f"sqlite:///{tmp / 'control.db'}"
        self.ports = {name: 20000 + i for i, name in enumerate(SERVICES)}
        self.procs: list[subprocess.Popen[str]] = []
        # networks beyond the host: name -> (netns, host side /24 address, far side address)
        token = secrets.token_hex(3)
        self.beyond = {
            "lan": (f"unkl-{token}", "10.123.0.1", "10.123.0.2"),
            "public": (f"unkp-{token}", "198.51.100.1", "198.51.100.2"),
        }
        self.beyond_port = 20080

    def _spawn(self, *argv: str, log: str, ns: str | None = None) -> subprocess.Popen[str]:
        with open(self.tmp / log, "w") as errlog:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns or self.ns}", sys.executable, *argv],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog, text=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "up"], check=True)
        # a host forwards (NAT for its VMs): only metald's rules keep tenants apart
        subprocess.run(["ip", "netns", "exec", self.ns, "sysctl", "-q", "-w",
                        "net.ipv4.ip_forward=1"], check=True)  # fmt: skip
        upgrade(make_engine(self.url))
        ls = self._spawn("-c", _LISTEN, *map(str, self.ports.values()), log="listen.log")
        assert ls.stdout and ls.stdout.readline().startswith("LISTENING")
        for i, (name, (ns, near, far)) in enumerate(self.beyond.items()):
            link = f"ext{i}{self.ns[-6:]}"  # (never "unk*": the name of VM links)
            subprocess.run(["ip", "netns", "add", ns], check=True)
            script = (f"link add {link} type veth peer name eth0 netns {ns}\n"
                      f"addr add {near}/24 dev {link}\nlink set {link} up\n")  # fmt: skip
            subprocess.run(["ip", "-n", self.ns, "-batch", "-"], input=script, text=True,
                           check=True)  # fmt: skip
            far_script = f"link set lo up\naddr add {far}/24 dev eth0\nlink set eth0 up\n"
            far_script += f"route add default via {near}\n"
            if name == "lan":  # the cloud metadata service lives on the provider's network
                far_script += "addr add 169.254.169.254/32 dev eth0\n"
            subprocess.run(["ip", "-n", ns, "-batch", "-"], input=far_script, text=True,
                           check=True)  # fmt: skip
            if name == "lan":
                subprocess.run(["ip", "-n", self.ns, "route", "add", "169.254.169.254/32",
                                "via", far], check=True)  # fmt: skip
            ports = [str(self.beyond_port), *(["53"] if name == "lan" else [])]
            srv = self._spawn("-c", _LISTEN, *ports, log=f"{name}.log", ns=ns)
            assert srv.stdout and srv.stdout.readline().startswith("LISTENING")
        agent = self._spawn(
            "-m", "unkey_deploy.metald.agent", "--database-url", self.url,
            "--state-dir", str(self.tmp / "h1"), "--host-name", "h1", "--subnet", self.subnet,
            "--driver", "sandbox", "--cpus", "4", "--memory-mib", "2048", "--interval", "0.05",
            "--guest-dns", self.beyond["lan"][2],  # a resolver on the private LAN
            log="agent.log",
        )  # fmt: skip
        line = agent.stdout.readline() if agent.stdout else ""
        assert line.startswith("READY"), (self.tmp / "agent.log").read_text()
        self.host_id = line.split()[1]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for f in (proc.stdin, proc.stdout):
                if f:
                    f.close()
        for ns, _, _ in self.beyond.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)

    def addresses(self) -> list[str]:
        """Every address of the host (IPv6 in brackets; link-local ones as the guest sees
        them, over its own link)."""
        cmd = ["ip", "-n", self.ns, "-j", "addr", "show"]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        addrs = []
        for link in out:
            for a in link.get("addr_info", []):
                if a["family"] == "inet":
                    addrs.append(a["local"])
                elif a["family"] == "inet6":
                    local = a["local"] + ("%eth0" if a["local"].startswith("fe80") else "")
                    addrs.append(f"[{local}]")
        return addrs


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with reserved_subnet() as subnet:
        h = Host(tmp_path, subnet)
        try:
            h.start()
            yield h
        finally:
            h.stop()


def _guest_pid(engine: Engine, vm_id: str) -> int:
    with engine.connect() as c:
        row = c.execute(sa.select(models.vms.c.runtime).where(models.vms.c.vm_id == vm_id)).one()
    # the sandbox's pid 1: below the launcher's shell (the VM's pid) and bwrap, which both stay
    # in the host's root
    pid = int(row.runtime["pid"])
    while Path(f"/proc/{pid}/comm").read_text().strip() in ("sh", "bwrap"):
        pid = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    return pid


def test_guest_reaches_only_its_app_clients_and_public_networks(host: Host, tmp_path: Path) -> None:
    engine = make_engine(host.url)
    sched = Scheduler(engine)
    rootfs = build_test_rootfs(tmp_path / "rootfs.ext4", port=8080)
    vms: list[Vm] = []
    for dep, cust in (("dep_a", "cust_a"), ("dep_b", "cust_b")):
        vm = sched.create_vm(CreateVm(dep, cust, rootfs, memory_bytes=64 << 20))
        sched.boot(vm.vm_id)
        vms.append(sched.wait_state(vm.vm_id, {VmState.RUNNING, VmState.FAILED}, timeout=60))
    guest, other = vms
    assert guest.state == other.state == VmState.RUNNING, (guest.error, other.error)
    assert guest.net is not None and other.net is not None
    ns = netns_name(guest.vm_id)
    assert guest.net.netns == ns
    control = [f"{a}:{p}" for a in host.addresses() for p in host.ports.values()]
    # the host side of the guest's own link is among them
    assert f"{guest.net.host_ip}:{host.ports['gatewayd']}" in control
    assert any(t.startswith("[fe80") for t in control), "IPv6 link-local tried too"
    neighbour = f"{other.net.guest_ip}:8080"
    port = host.beyond_port
    lan, public = host.beyond["lan"][2], host.beyond["public"][2]
    private = [f"{lan}:{port}", f"169.254.169.254:{port}"]
    internet = f"{public}:{port}"
    resolver = f"{lan}:53"  # the guests' name server (metald.guest_dns) is on the LAN

    # the host reaches its services on its IPv4 addresses, the other VM and the networks beyond
    v4 = [t for t in control if not t.startswith("[")]
    from_host = probe([*v4, neighbour, *private, internet, resolver], netns=host.ns)
    assert set(from_host.values()) == {"connected"}, from_host

    from_guest = probe([*control, neighbour, *private, internet, resolver], netns=ns)
    reached = {t: r for t, r in from_guest.items() if r == "connected"}
    # the public network, through the host's NAT, and its name server's port 53 only
    assert reached == {internet: "connected", resolver: "connected"}, f"the guest reached {reached}"
    assert set(from_guest) == {*control, neighbour, *private, internet, resolver}
    # and the guest is told to use it
    pid = _guest_pid(engine, guest.vm_id)
    assert Path(f"/proc/{pid}/root/etc/resolv.conf").read_text() == f"nameserver {lan}\n"
    # private destinations are refused at once (an app fails fast instead of hanging)
    assert {from_guest[t] for t in private} == {"ConnectionRefusedError"}, from_guest

    # control: without metald's rules the guest does reach the host's services and the VM
    tag = hashlib.sha1(f"{host.host_id}|{host.subnet}".encode(), usedforsecurity=False)
    subprocess.run(["ip", "netns", "exec", host.ns, "nft", "delete", "table", "inet",
                    f"unkey_{tag.hexdigest()[:8]}"], check=True)  # fmt: skip
    own_link = f"{guest.net.host_ip}:{host.ports['nats']}"
    opened = probe([own_link, neighbour, private[0]], netns=ns)
    assert opened == {own_link: "connected", neighbour: "connected", private[0]: "connected"}

    for vm in vms:
        sched.delete(vm.vm_id)
    deadline = time.monotonic() + 30
    while sched.list() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched.list() == []
    sched.close()
    engine.dispose()
