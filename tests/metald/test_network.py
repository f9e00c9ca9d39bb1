"""The IP allocator (persisted, survives restarts) and the per-VM links."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine

from unkey_deploy.core.errors import ResourceExhausted
from unkey_deploy.metald.network import (
    HostNetwork,
    IpAllocator,
    host_nameservers,
    iface_name,
    netns_name,
)


def test_leases_are_unique_stable_and_persisted(engine: Engine) -> None:
    ips = IpAllocator(engine, "host_a", "172.31.0.0/27")  # 8 slots, slot 0 reserved
    got = [ips.lease(f"vm_{i}") for i in range(7)]
    assert sorted(got) == list(range(1, 8))
    assert ips.lease("vm_3") == got[3]  # idempotent
    with pytest.raises(ResourceExhausted, match="no free /30"):
        ips.lease("vm_overflow")
    # another host has its own address space
    assert IpAllocator(engine, "host_b", "172.31.0.0/27").lease("vm_other") == 1
    # "restart": a new allocator sees the same leases
    again = IpAllocator(engine, "host_a", "172.31.0.0/27")
    assert again.leased() == {f"vm_{i}": got[i] for i in range(7)}
    again.release("vm_2")
    assert again.lease("vm_new") == got[2]
    assert ips.addresses(1) == ("172.31.0.5", "172.31.0.6")


def test_concurrent_leases_never_collide(engine: Engine) -> None:
    ips = IpAllocator(engine, "host_a", "172.31.0.0/24")
    out: dict[str, int] = {}

    def worker(n: int) -> None:
        for i in range(8):
            out[f"vm_{n}_{i}"] = ips.lease(f"vm_{n}_{i}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out.values())) == 32


@pytest.mark.root
def test_tap_and_netns_links_are_created_and_removed(subnet: str) -> None:
    net = HostNetwork(subnet, table="unkey_test_links")
    base = subnet.rsplit(".", 1)[0]
    tap = net.attach_tap("vm_tapcheck_" + base.replace(".", ""), f"{base}.1", f"{base}.2")
    try:
        assert tap.host_iface and Path(f"/sys/class/net/{tap.host_iface}").exists()
        out = subprocess.run(["ip", "-4", "addr", "show", tap.host_iface], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        assert f"{base}.1/30" in out
    finally:
        net.detach(tap)
    assert not Path(f"/sys/class/net/{tap.host_iface}").exists()
    vm = "vm_nscheck_" + base.replace(".", "")
    ns = net.attach_netns(vm, f"{base}.5", f"{base}.6")
    try:
        assert ns.netns == netns_name(vm) and Path(f"/run/netns/{ns.netns}").exists()
        out = subprocess.run(["ip", "-n", ns.netns, "-4", "addr", "show", "eth0"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert f"{base}.6/30" in out
    finally:
        net.detach(ns)
    assert not Path(f"/run/netns/{ns.netns}").exists()
    assert not Path(f"/sys/class/net/{iface_name(vm)}").exists()


@pytest.mark.root
def test_nftables_table_is_ours_and_removable(subnet: str) -> None:
    net = HostNetwork(subnet, table="unkey_test_nft")
    net.setup()
    try:
        assert net.has_rules()
        rules = subprocess.run(["nft", "list", "table", "ip", "unkey_test_nft_nat"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert f"ip saddr {subnet}" in rules and "masquerade" in rules
    finally:
        net.teardown()
    assert not net.has_rules()


def test_zstd_assets_decompress_to_sparse_files(tmp_path: Path) -> None:
    import zstandard

    from unkey_deploy.metald.jail import decompress_zstd_sparse

    raw = tmp_path / "disk.img"
    with open(raw, "wb") as f:
        f.write(b"head" * 1000)
        f.seek(64 << 20)
        f.write(b"tail")
    packed = tmp_path / "disk.img.zst"
    packed.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw.read_bytes()))
    out = tmp_path / "out.ext4"
    decompress_zstd_sparse(packed, out)
    assert out.read_bytes() == raw.read_bytes()
    assert out.stat().st_blocks * 512 < 4 << 20, "zeros must become holes"


def test_host_nameservers_skip_local_stubs(tmp_path: Path) -> None:
    resolv, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    resolv.write_text(
        "# comment\nsearch example.org\nnameserver 10.0.0.2\nnameserver ::1\n"
        "nameserver fe80::1%eth0\nnameserver 2001:db8::1\noptions edns0\n"
    )
    assert host_nameservers(resolv, upstream) == ["10.0.0.2", "2001:db8::1"]
    # systemd-resolved: the stub is the host's own; its upstream servers are what guests use
    resolv.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    upstream.write_text("nameserver 192.0.2.1\nnameserver 192.0.2.2\n")
    assert host_nameservers(resolv, upstream) == ["192.0.2.1", "192.0.2.2"]
    upstream.unlink()
    assert host_nameservers(resolv, upstream) == []


def test_host_nameservers_for_a_guest_on_the_host_network(tmp_path: Path) -> None:
    # the sandbox without root shares the host's network, loopback included: the local stub
    # is its resolver too (a scoped link-local address stays as written)
    resolv, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    resolv.write_text("nameserver 127.0.0.53\nnameserver fe80::1%eth0\noptions edns0\n")
    upstream.write_text("nameserver 192.0.2.1\n")
    assert host_nameservers(resolv, upstream, host_network=True) == ["127.0.0.53", "fe80::1%eth0"]
    assert host_nameservers(resolv, upstream) == ["192.0.2.1"]
