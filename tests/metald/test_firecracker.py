"""The firecracker driver against Firecracker's published OpenAPI spec (no binary can run here).

Every request the driver sends is validated against the spec, both directly (the boot plan) and
on the wire, through a fake Firecracker process that serves the API on a unix socket and
rejects what the spec rejects.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from unkey_deploy.core.errors import VmError
from unkey_deploy.metald.drivers.base import NetAttachment, VmSpec
from unkey_deploy.metald.drivers.firecracker import ApiCall, FirecrackerDriver
from unkey_deploy.metald.kernel import KernelPaths
from unkey_deploy.metald.service import CreateVm, Metald
from unkey_deploy.metald.states import VmState
from unkey_deploy.testing.firecracker_api import FirecrackerSpec
from unkey_deploy.testing.rootfs import build_test_rootfs

SPEC_PATH = Path("/work/shared/specs/firecracker/firecracker.yaml")


@pytest.fixture(scope="module")
def fc_spec() -> FirecrackerSpec:
    if not SPEC_PATH.exists():
        pytest.fail(f"Firecracker's OpenAPI spec is expected at {SPEC_PATH}")
    return FirecrackerSpec(SPEC_PATH)


def _spec(tmp_path: Path, kernel: KernelPaths, *, netns: str | None = None) -> VmSpec:
    workdir = tmp_path / "jail"
    workdir.mkdir(exist_ok=True)
    rootfs = build_test_rootfs(workdir / "rootfs.ext4")
    return VmSpec(
        vm_id="vm_01JTESTFIRECRACKER0000000",  # type: ignore[arg-type]
        instance_id="inst_01JTESTFIRECRACKER00000",  # type: ignore[arg-type]
        customer_id="cust_a",  # type: ignore[arg-type]
        vcpus=2,
        memory_bytes=256 << 20,
        port=8080,
        workdir=workdir,
        rootfs=rootfs,
        net=NetAttachment(
            mode="tap",
            host_iface="unkfc0",
            host_ip="172.31.9.1",
            guest_ip="172.31.9.2",
            mac="52:54:00:aa:bb:cc",
            netns=netns,
        ),
        kernel=kernel,
    )


def test_validator_rejects_what_the_spec_rejects(fc_spec: FirecrackerSpec) -> None:
    ok = {"vcpu_count": 2, "mem_size_mib": 256}
    assert fc_spec.validate("PUT", "/machine-config", ok) == []
    assert fc_spec.validate("PUT", "/machine-config", {"vcpu_count": 2})  # missing required
    assert fc_spec.validate("PUT", "/machine-config", {**ok, "vcpu_count": "2"})  # wrong type
    assert fc_spec.validate("PUT", "/machine-config", {**ok, "ram": 1})  # unknown field
    assert fc_spec.validate("PUT", "/actions", {"action_type": "Reboot"})  # not in the enum
    assert fc_spec.validate("PUT", "/no-such-thing", {})  # unknown path
    assert fc_spec.validate("DELETE", "/machine-config", None)  # unknown method
    assert fc_spec.validate("PUT", "/boot-source", None)  # required body
    drive = {"drive_id": "rootfs", "is_root_device": True, "path_on_host": "/r"}
    assert fc_spec.validate("PUT", "/drives/rootfs", drive) == []
    assert fc_spec.validate("PUT", "/drives/other", drive)  # id differs from the path
    assert fc_spec.validate("GET", "/", None) == []


@pytest.mark.parametrize("jailed", [True, False])
def test_every_boot_request_matches_the_spec(
    fc_spec: FirecrackerSpec, tmp_path: Path, kernel: KernelPaths, jailed: bool
) -> None:
    drv = FirecrackerDriver(kernel, tmp_path / "state", firecracker_bin="/usr/bin/firecracker",
                            jailer_bin="/usr/bin/jailer" if jailed else None)  # fmt: skip
    plan = drv.plan(_spec(tmp_path, kernel))
    assert [(c.method, c.path) for c in plan] == [
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/metrics"),
        ("PUT", "/actions"),
    ]
    for c in plan:
        assert fc_spec.validate(c.method, c.path, c.body) == [], c
    # the stop and metering requests too
    for action in ("SendCtrlAltDel", "FlushMetrics"):
        assert fc_spec.validate("PUT", "/actions", {"action_type": action}) == []
    boot = plan[1].body or {}
    assert "unkey.ip=172.31.9.2/30" in boot["boot_args"]
    assert "unkey.gw=172.31.9.1" in boot["boot_args"]
    if jailed:  # paths are relative to the jailer's chroot
        assert boot["kernel_image_path"] == "/vmlinux"


def test_jailer_command(tmp_path: Path, kernel: KernelPaths) -> None:
    drv = FirecrackerDriver(kernel, tmp_path / "state", firecracker_bin="/usr/bin/firecracker",
                            jailer_bin="/usr/bin/jailer", cgroup_version=2)  # fmt: skip
    spec = _spec(tmp_path, kernel, netns="unk-vm")
    argv = drv.jailer_command(spec)
    assert argv[0] == "/usr/bin/jailer"

    def opt(name: str) -> list[str]:
        return [argv[i + 1] for i, a in enumerate(argv) if a == name]

    assert opt("--id") == ["vm-01JTESTFIRECRACKER0000000"]
    assert opt("--exec-file") == ["/usr/bin/firecracker"]
    assert opt("--uid") == ["65534"] and opt("--gid") == ["65534"]
    assert opt("--chroot-base-dir") == ["/srv/jailer"]
    assert opt("--cgroup-version") == ["2"]
    assert opt("--cgroup") == ["cpu.max=200000 100000", f"memory.max={(256 + 64) << 20}"]
    assert opt("--netns") == ["/var/run/netns/unk-vm"]
    assert argv[argv.index("--") + 1 :] == ["--api-sock", "/run/firecracker.socket"]
    assert drv.chroot_root(spec) == Path(
        "/srv/jailer/firecracker/vm-01JTESTFIRECRACKER0000000/root"
    )
    v1 = FirecrackerDriver(kernel, tmp_path / "s", firecracker_bin="/f", jailer_bin="/j",
                           cgroup_version=1).jailer_command(spec)  # fmt: skip
    assert "cpu.cfs_quota_us=200000" in v1 and f"memory.limit_in_bytes={(256 + 64) << 20}" in v1


def _fake_firecracker(tmp_path: Path, kernel: KernelPaths) -> tuple[FirecrackerDriver, Path]:
    """The driver with our fake Firecracker (its API checked against the spec) as its binary,
    and the file the fake records each request in."""
    record = tmp_path / "requests.jsonl"
    fake = tmp_path / "firecracker"
    fake.write_text(
        f"#!/bin/sh\nexec {sys.executable} -m unkey_deploy.testing.firecracker_api "
        f'--spec {SPEC_PATH} --record {record} "$@"\n'
    )
    fake.chmod(0o755)
    drv = FirecrackerDriver(kernel, tmp_path / "state", firecracker_bin=str(fake), jailer_bin=None)
    return drv, record


def test_driver_against_a_fake_firecracker_process(tmp_path: Path, kernel: KernelPaths) -> None:
    drv, record = _fake_firecracker(tmp_path, kernel)
    spec = _spec(tmp_path, kernel)
    drv.create(spec)
    rt = drv.boot(spec)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["problems"] for c in calls] == [[]] * 6, calls
    assert calls[-1]["body"] == {"action_type": "InstanceStart"}
    assert drv.inspect(rt) and drv.recover(rt)
    # runtime: configuration is refused after InstanceStart, as Firecracker does
    with pytest.raises(VmError, match="not supported after starting"):
        drv.call(rt.api_socket or "", ApiCall("PUT", "/machine-config",
                                               {"vcpu_count": 1, "mem_size_mib": 128}))  # fmt: skip
    drv.stats(rt, spec)  # FlushMetrics is accepted
    drv.stop(rt, timeout=5)
    deadline = time.monotonic() + 5
    while drv.inspect(rt) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not drv.inspect(rt)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert all(c["problems"] == [] for c in calls), calls
    assert calls[-1]["body"] == {"action_type": "SendCtrlAltDel"}
    assert not Path(rt.api_socket or "").exists()


def test_a_failed_boot_leaves_no_process_nor_socket(tmp_path: Path, kernel: KernelPaths) -> None:
    drv, record = _fake_firecracker(tmp_path, kernel)  # record: on the fake's command line
    spec = dataclasses.replace(_spec(tmp_path, kernel), net=NetAttachment(mode="host"))
    drv.create(spec)
    sock = drv.api_socket(spec)
    with pytest.raises(VmError, match="needs a tap network attachment"):
        drv.boot(spec)  # the process starts and opens its socket, then the plan is refused
    assert not sock.exists(), "the API socket of a failed boot was left"
    alive = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and str(record) in _cmd(p)]
    assert alive == [], "the firecracker process of a failed boot survived"


def _cmd(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_unavailable_without_binaries(tmp_path: Path, kernel: KernelPaths) -> None:
    drv = FirecrackerDriver(kernel, tmp_path, firecracker_bin=None, jailer_bin=None)
    drv.firecracker_bin = None
    caps = drv.capabilities()
    assert not caps.available and "not found" in caps.reason


@pytest.mark.root
def test_metald_with_the_firecracker_driver(
    tmp_path: Path, kernel: KernelPaths, make_metald: Callable[..., Metald]
) -> None:
    """metald prepares the jail (kernel, vmlinux, rootfs copy), a tap, a cgroup, and drives the
    (fake) Firecracker through a full boot and teardown; every request passes the spec."""
    drv, record = _fake_firecracker(tmp_path, kernel)
    md = make_metald("sandbox")  # any driver to build it, then swap in firecracker
    md.driver = drv
    image = build_test_rootfs(tmp_path / "img.ext4")
    vm = md.create_vm(CreateVm("dep_fc", "cust_a", image, vcpus=2, memory_bytes=128 << 20,
                               env={"GREETING": "hi"}))  # fmt: skip
    vm = md.boot(vm.vm_id)
    assert vm.state == VmState.BOOTING and vm.net is not None and vm.net.mode == "tap"
    jail = md.jails.path(vm.vm_id)
    assert (jail / "vmlinux").exists() and (jail / "rootfs.ext4").exists()
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["problems"] for c in calls] == [[]] * 6
    by_path = {c["path"]: c["body"] for c in calls}
    assert by_path["/machine-config"]["vcpu_count"] == 2
    assert by_path["/machine-config"]["mem_size_mib"] == 128
    assert by_path["/network-interfaces/eth0"]["host_dev_name"] == vm.net.host_iface
    assert by_path["/drives/rootfs"]["path_on_host"] == str(jail / "rootfs.ext4")
    mt = md.meter_target(vm.vm_id)
    assert mt.firecracker_metrics is not None and mt.qmp_socket is None
    iface = vm.net.host_iface
    assert iface and Path(f"/sys/class/net/{iface}").exists()
    md.delete(vm.vm_id)
    assert not Path(f"/sys/class/net/{iface}").exists()
    assert not jail.exists()
    assert not md.cgroups.paths_for(vm.vm_id).exists()
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls[-1]["body"] == {"action_type": "SendCtrlAltDel"}
    assert all(c["problems"] == [] for c in calls)
