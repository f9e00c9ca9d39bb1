"""VM networking: an IP allocator persisted in the DB, per-VM links, isolation and NAT.

Design (root): every VM gets its own point-to-point /30 out of ``MetaldConfig.subnet`` — host
side ``.1``, guest ``.2`` — on its own link: a tap (qemu, firecracker) or a veth pair into a
per-VM network namespace (sandbox). There is no shared bridge, so VMs share no L2 segment; an
nftables table owned by this metald drops forwarding between VM links (tenants cannot reach each
other), drops new connections from VMs to the host itself, rejects VM traffic to the private,
link-local (cloud metadata) and reserved ranges of ``MetaldConfig.egress_deny`` (exceptions:
``egress_allow``), and masquerades VM traffic leaving by any other interface (NAT; the operator
enables ``net.ipv4.ip_forward``, metald never flips host sysctls). The app's port is reachable
from the host at ``<guest ip>:<port>``.

Without root: QEMU user-mode networking with the app port forwarded from 127.0.0.1 (qemu), or
the host's network (sandbox).

Slots are leased per host in ``metald_ip_leases`` (primary key host+slot, unique VM), so two VMs
never get the same /30 and a restarted metald finds the same addresses.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from ..core.errors import ResourceExhausted, UnkeyError, VmError
from ..core.log import event
from ..core.log import get as get_logger
from . import linux, models
from .drivers.base import Launcher, NetAttachment

_log = get_logger("metald.network")
IFACE_PREFIX = "unk"
# lease holder names of the spare links a NetnsPool keeps ready (never a VM id: those are "vm_")
POOL_PREFIX = "pool_"


def iface_name(vm_id: str) -> str:
    """A stable interface name for a VM (IFNAMSIZ is 16 including the NUL)."""
    return IFACE_PREFIX + hashlib.sha1(vm_id.encode(), usedforsecurity=False).hexdigest()[:11]


def netns_name(vm_id: str) -> str:
    return f"unk-{vm_id.lower()}"


def _ip(args: list[str], batch: str | None = None, netns: str | None = None) -> None:
    cmd = ["ip"] + (["-n", netns] if netns else []) + args
    if batch is not None:
        cmd += ["-batch", "-"]
    proc = subprocess.run(cmd, input=batch, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-400:]}")


def host_nameservers(
    resolv: Path = Path("/etc/resolv.conf"),
    upstream: Path = Path("/run/systemd/resolve/resolv.conf"),
    *,
    host_network: bool = False,
) -> list[str]:
    """The host's name servers a guest can use: those of ``resolv``, or of systemd-resolved's
    ``upstream`` file when ``resolv`` names only local (loopback) stubs, which a guest cannot
    reach (its connections to the host are dropped, and 127.x is the guest's own). With
    ``host_network`` (a guest on the host's own network, loopback included) the local stubs
    are kept: they are the host's resolvers there too."""
    for f in (resolv, upstream):
        found = []
        with contextlib.suppress(OSError):
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        ip = ipaddress.ip_address(parts[1].split("%")[0])
                        if host_network or not (ip.is_loopback or ip.is_link_local):
                            found.append(parts[1] if host_network else str(ip))
        if found:
            return found
    return []


def _per_family(
    items: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]
    | Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> list[tuple[str, str]]:
    """(nftables family keyword, the items as a set's elements) for IPv4 then IPv6, each only
    when it has items."""
    out = []
    for fam, version in (("ip", 4), ("ip6", 6)):
        mine = [str(i) for i in items if i.version == version]
        if mine:
            out.append((fam, ", ".join(mine)))
    return out


# a boot's lease hand-over (NetnsPool.take), built once (see metald.service._SELECT_VM)
_REASSIGN = (
    models.ip_leases.update()
    .where(
        models.ip_leases.c.host_id == sa.bindparam("p_host"),
        models.ip_leases.c.vm_id == sa.bindparam("p_old"),
    )
    .values(vm_id=sa.bindparam("p_new"), leased_at=sa.bindparam("p_at"))
)


class IpAllocator:
    """Leases /30 slots of ``subnet`` to VMs on one host, persisted in the database."""

    def __init__(self, engine: Engine, host_id: str, subnet: str) -> None:
        self.engine = engine
        self.host_id = host_id
        self.net = ipaddress.IPv4Network(subnet)
        if self.net.prefixlen > 29:
            raise VmError(f"subnet {subnet} is too small: it needs room for at least two /30s")
        self.slots = self.net.num_addresses // 4

    def addresses(self, slot: int) -> tuple[str, str]:
        """(host ip, guest ip) of ``slot``."""
        base = self.net.network_address + 4 * slot
        return str(base + 1), str(base + 2)

    def lease(self, vm_id: str) -> int:
        """The VM's slot (the existing one if it has a lease). Safe against concurrent leases."""
        t = models.ip_leases
        for _ in range(20):
            with self.engine.begin() as c:
                row = c.execute(sa.select(t.c.slot).where(t.c.vm_id == vm_id)).first()
                if row is not None:
                    return int(row.slot)
                used = {
                    int(r.slot)
                    for r in c.execute(sa.select(t.c.slot).where(t.c.host_id == self.host_id))
                }
                # slot 0 holds the subnet's network address: skip it to avoid surprises
                free = next((s for s in range(1, self.slots) if s not in used), None)
                if free is None:
                    raise ResourceExhausted(
                        f"no free /30 left in {self.net} on host {self.host_id}",
                        suggestion="use a larger MetaldConfig.subnet",
                    )
                try:
                    c.execute(
                        t.insert().values(
                            host_id=self.host_id, slot=free, vm_id=vm_id, leased_at=time.time()
                        )
                    )
                    return free
                except IntegrityError:
                    pass  # somebody took it between our read and write: try again
            time.sleep(0.01)
        raise VmError(f"could not lease an address for {vm_id}")

    def release(self, vm_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(models.ip_leases.delete().where(models.ip_leases.c.vm_id == vm_id))

    def leased(self, *, pooled: bool = False) -> dict[str, int]:
        """VM id -> slot of this host's leases (with ``pooled``: the spare links' instead)."""
        t = models.ip_leases
        with self.engine.connect() as c:
            rows = c.execute(sa.select(t.c.vm_id, t.c.slot).where(t.c.host_id == self.host_id))
            return {
                str(r.vm_id): int(r.slot)
                for r in rows
                if str(r.vm_id).startswith(POOL_PREFIX) == pooled
            }

    def reassign(self, old: str, new: str) -> None:
        """Hand ``old``'s lease (same slot) to ``new`` in one write."""
        with self.engine.begin() as c:
            res = c.execute(
                _REASSIGN,
                {"p_host": self.host_id, "p_old": old, "p_new": new, "p_at": time.time()},
            )
        if res.rowcount != 1:
            raise VmError(f"no address lease {old} on host {self.host_id} to hand to {new}")


class HostNetwork:
    """Creates and removes VM links and this metald's nftables table."""

    def __init__(
        self,
        subnet: str,
        table: str,
        *,
        egress_deny: Sequence[str] = (),
        egress_allow: Sequence[str] = (),
        dns: Sequence[str] = (),
    ) -> None:
        self.subnet = str(ipaddress.IPv4Network(subnet))
        self.table = table
        self.egress_deny = [ipaddress.ip_network(n, strict=False) for n in egress_deny]
        self.egress_allow = [ipaddress.ip_network(n, strict=False) for n in egress_allow]
        self.dns = [ipaddress.ip_address(a) for a in dns]

    def _egress_rules(self) -> str:
        """Forward-chain rules for connections VMs open to other networks: ``egress_allow``
        first, then ``egress_deny`` (rejected at once, so an app sees "unreachable" rather
        than a hang)."""
        p = IFACE_PREFIX
        # replies (to a client on a private network that reached the app) always pass
        lines = [f'    iifname "{p}*" ct state established,related accept']
        # the guests' name servers (guest_dns), on port 53 only
        lines += [f'    iifname "{p}*" {fam} daddr {{ {dns} }} meta l4proto {{ tcp, udp }} th '
                  "dport 53 accept" for fam, dns in _per_family(self.dns)]  # fmt: skip
        for verdict, nets in (("accept", self.egress_allow), ("reject", self.egress_deny)):
            lines += [f'    iifname "{p}*" {fam} daddr {{ {cidrs} }} {verdict}'
                      for fam, cidrs in _per_family(nets)]  # fmt: skip
        return "\n".join(lines)

    def ruleset(self) -> str:
        t, p = self.table, IFACE_PREFIX
        return f"""
table inet {t} {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{p}*" oifname "{p}*" drop
{self._egress_rules()}
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{p}*" ct state established,related accept
    iifname "{p}*" drop
  }}
}}
table ip {t}_nat {{
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {self.subnet} oifname != "{p}*" masquerade
  }}
}}
"""

    def setup(self) -> None:
        """Install (or replace) this metald's nftables tables."""
        self.teardown()
        proc = subprocess.run(
            ["nft", "-f", "-"], input=self.ruleset(), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise VmError(f"nft failed: {proc.stderr.strip()[-400:]}")

    def teardown(self) -> None:
        for fam, name in (("inet", self.table), ("ip", f"{self.table}_nat")):
            subprocess.run(["nft", "delete", "table", fam, name], capture_output=True, check=False)

    def has_rules(self) -> bool:
        proc = subprocess.run(
            ["nft", "list", "table", "inet", self.table], capture_output=True, check=False
        )
        return proc.returncode == 0

    def attach_tap(self, vm_id: str, host_ip: str, guest_ip: str) -> NetAttachment:
        name = iface_name(vm_id)
        self.detach_iface(name)
        _ip([], batch=f"tuntap add dev {name} mode tap\naddr add {host_ip}/30 dev {name}\n"
            f"link set {name} up\n")  # fmt: skip
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in hashlib.sha1(vm_id.encode(),
              usedforsecurity=False).digest()[:3])  # fmt: skip
        return NetAttachment(
            mode="tap", host_iface=name, host_ip=host_ip, guest_ip=guest_ip, mac=mac
        )

    def attach_netns(self, vm_id: str, host_ip: str, guest_ip: str) -> NetAttachment:
        name, ns = iface_name(vm_id), netns_name(vm_id)
        self.detach_iface(name)
        self.delete_netns(ns)
        _ip(["netns", "add", ns])
        try:
            _ip([], batch=f"link add {name} type veth peer name eth0 netns {ns}\n"
                f"addr add {host_ip}/30 dev {name}\nlink set {name} up\n")  # fmt: skip
            _ip([], netns=ns, batch=f"link set lo up\naddr add {guest_ip}/30 dev eth0\n"
                f"link set eth0 up\nroute add default via {host_ip}\n")  # fmt: skip
            # The netns belongs to the host's user namespace, so an unprivileged app (the
            # sandbox drops to an unprivileged uid) could not bind ports < 1024 in it: lower
            # that per-netns limit here, once, instead of in a shell on every boot.
            try:
                linux.netns_sysctl(f"/run/netns/{ns}", "net/ipv4/ip_unprivileged_port_start", "0")
            except OSError as exc:
                raise VmError(f"netns {ns}: {exc}") from exc
        except VmError:
            self.detach_iface(name)
            self.delete_netns(ns)
            raise
        return NetAttachment(
            mode="netns", host_iface=name, netns=ns, host_ip=host_ip, guest_ip=guest_ip
        )

    @staticmethod
    def iface_exists(name: str) -> bool:
        # /proc/net/dev follows the netns of the reading process; /sys/class/net follows the
        # netns sysfs was mounted in, which differs when metald was started with nsenter
        for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
            if line.split(":", 1)[0].strip() == name:
                return True
        return False

    @classmethod
    def detach_iface(cls, name: str) -> None:
        if cls.iface_exists(name):
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)

    @staticmethod
    def delete_netns(ns: str) -> None:
        if Path(f"/run/netns/{ns}").exists():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def detach(self, att: NetAttachment) -> None:
        """Remove what ``attach_*`` created (idempotent)."""
        if att.host_iface:
            self.detach_iface(att.host_iface)
        if att.netns:
            self.delete_netns(att.netns)
        if att.host_iface and self.iface_exists(att.host_iface):
            raise VmError(f"interface {att.host_iface} is still there after deleting it")


class NetnsPool:
    """Sandbox links made ahead of boots: network namespaces, each joined to the host by its veth
    pair, with an address slot leased and configured (what :meth:`HostNetwork.attach_netns` does
    at boot, ~3 ``ip`` commands and a lease, 20-30 ms on a loaded 2-core host).

    A spare's lease is held by a ``pool_*`` name; :meth:`take` hands the lease to the VM in one
    write and renames the namespace to the VM's (``netns_name(vm_id)``); the host end keeps the
    spare's interface name (recorded in the VM's NetAttachment like any other). A background
    thread refills the pool a moment after each take, so boots do not compete with it.
    With ``warm``, each spare also gets the VM's process made ahead: ``warm(pool_id, link)``
    returns a ``drivers.base.Launcher`` waiting in the spare's namespace (the sandbox's), which
    :meth:`take` hands out with the link.

    :meth:`close` removes the spares; spares left by a metald that died are removed by
    :meth:`reclaim` at the next start (their launchers exit when metald goes). With
    ``record_dir`` each spare is also recorded there (an empty file named after it), so a host
    whose leases an operator deleted (forgot the host) still finds its spares; :meth:`drop`
    removes the ready ones of a running pool."""

    def __init__(
        self,
        network: HostNetwork,
        ips: IpAllocator,
        size: int,
        *,
        refill_delay: float = 0.3,
        record_dir: Path | None = None,
        warm: Callable[[str, NetAttachment], Launcher | None] | None = None,
    ) -> None:
        self.network = network
        self.ips = ips
        self.size = size
        self.refill_delay = refill_delay
        self.record_dir = record_dir
        self.warm = warm
        self._ready: list[tuple[str, NetAttachment, Launcher | None]] = []
        self._generation = 0  # drop() counts: a spare made across one is not kept
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reclaim(self) -> int:
        """Remove the spares (links and leases) a previous metald of this host left behind."""
        found = set(self.ips.leased(pooled=True))
        if self.record_dir is not None and self.record_dir.is_dir():
            found |= {p.name for p in self.record_dir.glob(POOL_PREFIX + "*")}
        for pool_id in found:
            self.network.detach_iface(iface_name(pool_id))
            self.network.delete_netns(netns_name(pool_id))
            self.ips.release(pool_id)
            self._unrecord(pool_id)
        return len(found)

    def drop(self) -> int:
        """Remove the ready spares (their leases were deleted: the host was forgotten, and their
        slots may be handed out again); the pool refills with new leases."""
        with self._lock:
            spares, self._ready = self._ready, []
            self._generation += 1  # and the one being made, if any
        for spare in spares:
            self._discard(*spare)
        self._wake.set()
        return len(spares)

    def _record(self, pool_id: str) -> None:
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            (self.record_dir / pool_id).touch()

    def _unrecord(self, pool_id: str) -> None:
        if self.record_dir is not None:
            (self.record_dir / pool_id).unlink(missing_ok=True)

    def start(self) -> None:
        if self._thread is None and self.size > 0:
            self._thread = threading.Thread(target=self._fill_loop, name="metald-netns-pool",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def ready(self) -> int:
        with self._lock:
            return len(self._ready)

    def wait_full(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.ready() < self.size:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _make_one(self) -> None:
        generation = self._generation
        pool_id = POOL_PREFIX + secrets.token_hex(8)
        slot = self.ips.lease(pool_id)
        host_ip, guest_ip = self.ips.addresses(slot)
        self._record(pool_id)
        try:
            att = self.network.attach_netns(pool_id, host_ip, guest_ip)
        except VmError:
            self.ips.release(pool_id)
            self._unrecord(pool_id)
            raise
        try:
            launcher = self.warm(pool_id, att) if self.warm is not None else None
        except (OSError, VmError):
            self._discard(pool_id, att, None)
            raise
        with self._lock:
            # not once stopped, nor when drop() ran meanwhile (its lease may be gone)
            keep = not self._stop.is_set() and generation == self._generation
            if keep:
                self._ready.append((pool_id, att, launcher))
        if not keep:
            self._discard(pool_id, att, launcher)

    def _fill_loop(self) -> None:
        while not self._stop.is_set():
            if self.ready() >= self.size:
                self._wake.wait(1.0)
                self._wake.clear()
                # let the boot that took a spare get going before we spend CPU on its refill
                self._stop.wait(self.refill_delay)
                continue
            try:
                self._make_one()
            except (UnkeyError, OSError) as exc:
                event(_log, "netns pool refill", logging.WARNING, error=str(exc))
                self._stop.wait(1.0)

    def take(self, vm_id: str) -> tuple[NetAttachment, Launcher | None] | None:
        """A ready link for ``vm_id`` (its lease and namespace now the VM's) with its launcher
        (``warm``), or None when the pool is empty or its spare could not be handed over (the
        caller then makes one at boot). The caller owns the launcher: it runs it or discards
        it."""
        with self._lock:
            if not self._ready:
                return None
            pool_id, att, launcher = self._ready.pop(0)
        self._wake.set()
        ns = netns_name(vm_id)
        try:
            self.network.delete_netns(ns)
            linux.rename_bind_mount(f"/run/netns/{att.netns}", f"/run/netns/{ns}")
        except OSError as exc:
            event(_log, "netns pool take", logging.WARNING, vm_id=vm_id, error=str(exc))
            self._discard(pool_id, att, launcher)
            return None
        try:
            self.ips.reassign(pool_id, vm_id)
        except UnkeyError as exc:
            # its lease is gone (the host was forgotten meanwhile): the boot makes its own link
            event(_log, "netns pool take", logging.WARNING, vm_id=vm_id, error=str(exc))
            self._discard(pool_id, NetAttachment(**{**att.__dict__, "netns": ns}), launcher)
            return None
        self._unrecord(pool_id)  # the VM's now (its own record names the links)
        taken = NetAttachment(mode="netns", host_iface=att.host_iface, netns=ns,
                              host_ip=att.host_ip, guest_ip=att.guest_ip)  # fmt: skip
        return taken, launcher

    def _discard(self, pool_id: str, att: NetAttachment, launcher: Launcher | None) -> None:
        """Remove a spare. One whose links could not be removed keeps its lease and record,
        so :meth:`reclaim` at the next start finds it and tries again."""
        if launcher is not None:
            launcher.discard()
            with contextlib.suppress(OSError):
                launcher.log.unlink()
        try:
            self.network.detach(att)
        except VmError as exc:
            event(_log, "netns pool spare not removed", logging.WARNING, pool_id=pool_id,
                  error=str(exc))  # fmt: skip
            return
        self.ips.release(pool_id)
        self._unrecord(pool_id)

    def close(self) -> None:
        """Stop refilling and remove every spare."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            spares, self._ready = self._ready, []
        for spare in spares:
            self._discard(*spare)
