"""The ``firecracker`` driver: Firecracker's API over its unix socket, started by the jailer.

Boot sequence (every request is validated against Firecracker's OpenAPI spec in the tests):

    PUT /machine-config          {"vcpu_count", "mem_size_mib", "smt": false}
    PUT /boot-source             {"kernel_image_path": "/vmlinux", "initrd_path", "boot_args"}
    PUT /drives/rootfs           {"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", ...}
    PUT /network-interfaces/eth0 {"iface_id": "eth0", "host_dev_name": <tap>, "guest_mac"}
    PUT /metrics                 {"metrics_path": "/metrics.json"}
    PUT /actions                 {"action_type": "InstanceStart"}

Stop: ``SendCtrlAltDel``, then SIGKILL after the timeout. Disk counters: ``FlushMetrics`` then
the last line of the metrics file (``block.read_bytes`` / ``block.write_bytes``).

The jailer (``--id --exec-file --uid --gid --chroot-base-dir --cgroup-version --cgroup ...
[--netns]``) creates ``<chroot-base>/firecracker/<id>/root`` (base: ``/srv/jailer``),
applies the cgroup limits, joins the netns, chroots, drops to the unprivileged uid/gid and
execs Firecracker; metald hard-links the kernel and the VM's rootfs copy into that root
first. Paths in API bodies are then relative to the chroot.

Firecracker cannot run on our CI machines (no binary, and KVM cannot boot guests there), so
``capabilities()`` reports it unavailable unless both binaries exist and KVM really boots.
Note for production: Firecracker announces virtio-mmio devices on the kernel command line, so the
guest kernel needs ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y`` (the Debian cloud kernel lacks it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ...core.errors import VmError
from ..kernel import KernelPaths, guest_cmdline
from .base import (
    DriverCapabilities,
    VmRuntime,
    VmSpec,
    VmStats,
    kill_process,
    pid_start_time,
    process_alive,
    reap,
    spawn,
    wait_exit,
)
from .qemu import host_tsc_khz, probe_kvm


@dataclass(frozen=True)
class ApiCall:
    """One request to the Firecracker API."""

    method: str
    path: str
    body: dict[str, Any] | None


def _action(action_type: str) -> ApiCall:
    return ApiCall("PUT", "/actions", {"action_type": action_type})


def jailer_id(vm_id: str) -> str:
    """The jailer accepts ids of up to 64 alphanumerics and hyphens."""
    return vm_id.replace("_", "-")[:64]


class FirecrackerDriver:
    """Firecracker + jailer; see the module docstring."""

    name = "firecracker"

    def __init__(
        self,
        kernel: KernelPaths | None,
        state_dir: Path,
        *,
        firecracker_bin: str | None = None,
        jailer_bin: str | None = "auto",
        uid: int = 65534,
        gid: int = 65534,
        cgroup_version: int | None = None,
        chroot_base: Path = Path("/srv/jailer"),
        run_dir: Path | None = None,
    ) -> None:
        # Short paths on purpose: the API socket lives under them and unix socket paths must
        # stay under 108 bytes (the jailer's default base is /srv/jailer too).
        self.chroot_base = Path(chroot_base)
        self.run_dir = run_dir or Path("/run/unkey-metald")
        self.kernel = kernel
        self.state_dir = Path(state_dir)
        self.firecracker_bin = firecracker_bin or shutil.which("firecracker")
        self.jailer_bin = shutil.which("jailer") if jailer_bin == "auto" else jailer_bin
        self.uid, self.gid = uid, gid
        pure_v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        self.cgroup_version = cgroup_version or (2 if pure_v2 else 1)

    def capabilities(self) -> DriverCapabilities:
        nets = ("tap",)
        if not self.firecracker_bin or not self.jailer_bin:
            return DriverCapabilities(
                self.name, False, "firecracker/jailer binaries not found", networking=nets
            )
        if self.kernel is None:
            return DriverCapabilities(self.name, False, "guest kernel not prepared")
        ok, reason = probe_kvm(self.kernel)
        return DriverCapabilities(self.name, ok, reason, accel="kvm", networking=nets)

    # -- the plan -----------------------------------------------------------------------------
    def chroot_root(self, spec: VmSpec) -> Path:
        """Where the VMM sees ``/``: the jailer's root, or the jail dir when not jailed."""
        if self.jailer_bin:
            return self.chroot_base / "firecracker" / jailer_id(spec.vm_id) / "root"
        return spec.workdir

    def _inside(self, spec: VmSpec, name: str) -> str:
        return f"/{name}" if self.jailer_bin else str(self.chroot_root(spec) / name)

    def api_socket(self, spec: VmSpec) -> Path:
        if self.jailer_bin:
            return self.chroot_root(spec) / "run" / "firecracker.socket"
        return self.run_dir / f"{spec.vm_id}.fc.sock"

    def plan(self, spec: VmSpec) -> list[ApiCall]:
        """Every API request of a boot, in order."""
        net = spec.net
        if net.mode != "tap" or not net.host_iface:
            raise VmError("the firecracker driver needs a tap network attachment")
        boot_args = guest_cmdline(
            ip=f"{net.guest_ip}/{net.prefix}", gw=net.host_ip, tsc_khz=host_tsc_khz()
        )
        iface: dict[str, Any] = {"iface_id": "eth0", "host_dev_name": net.host_iface}
        if net.mac:
            iface["guest_mac"] = net.mac
        return [
            ApiCall("PUT", "/machine-config", {
                "vcpu_count": spec.vcpus,
                "mem_size_mib": max(32, spec.memory_bytes // (1024 * 1024)),
                "smt": False,
            }),
            ApiCall("PUT", "/boot-source", {
                "kernel_image_path": self._inside(spec, "vmlinux"),
                "initrd_path": self._inside(spec, "initramfs.img"),
                "boot_args": boot_args,
            }),
            ApiCall("PUT", "/drives/rootfs", {
                "drive_id": "rootfs",
                "path_on_host": self._inside(spec, "rootfs.ext4"),
                "is_root_device": True,
                "is_read_only": False,
            }),
            ApiCall("PUT", "/network-interfaces/eth0", iface),
            ApiCall("PUT", "/metrics", {"metrics_path": self._inside(spec, "metrics.json")}),
            ApiCall("PUT", "/actions", {"action_type": "InstanceStart"}),
        ]  # fmt: skip

    def jailer_command(self, spec: VmSpec) -> list[str]:
        """The jailer's argv (cgroup limits = vcpus and memory; optional netns)."""
        if not self.jailer_bin or not self.firecracker_bin:
            raise VmError("jailer/firecracker binaries not configured")
        period = 100_000
        mem = spec.memory_bytes + 64 * 1024 * 1024  # guest RAM + the VMM's own needs
        if self.cgroup_version == 2:
            limits = [f"cpu.max={spec.vcpus * period} {period}", f"memory.max={mem}"]
        else:
            limits = [
                f"cpu.cfs_period_us={period}",
                f"cpu.cfs_quota_us={spec.vcpus * period}",
                f"memory.limit_in_bytes={mem}",
            ]
        argv = [
            self.jailer_bin, "--id", jailer_id(spec.vm_id),
            "--exec-file", self.firecracker_bin,
            "--uid", str(self.uid), "--gid", str(self.gid),
            "--chroot-base-dir", str(self.chroot_base),
            "--cgroup-version", str(self.cgroup_version),
        ]  # fmt: skip
        for lim in limits:
            argv += ["--cgroup", lim]
        if spec.net.netns:
            argv += ["--netns", f"/var/run/netns/{spec.net.netns}"]
        return [*argv, "--", "--api-sock", "/run/firecracker.socket"]

    def command(self, spec: VmSpec) -> list[str]:
        if self.jailer_bin:
            return self.jailer_command(spec)
        if not self.firecracker_bin:
            raise VmError("firecracker binary not found")
        return [self.firecracker_bin, "--api-sock", str(self.api_socket(spec))]

    # -- lifecycle ----------------------------------------------------------------------------
    def create(self, spec: VmSpec) -> None:
        if spec.kernel is None:
            raise VmError("the firecracker driver needs a guest kernel")
        root = self.chroot_root(spec)
        (root / "run").mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name, src in (
            ("vmlinux", spec.kernel.vmlinux),
            ("initramfs.img", spec.kernel.initramfs),
            ("rootfs.ext4", spec.rootfs),
        ):
            dst = root / name
            if dst.resolve() != Path(src).resolve():
                with contextlib.suppress(FileNotFoundError):
                    dst.unlink()
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
        (root / "metrics.json").touch()
        if self.jailer_bin and os.geteuid() == 0:
            for name in ("rootfs.ext4", "metrics.json", "run"):
                os.chown(root / name, self.uid, self.gid)

    @staticmethod
    def _client(sock: Path | str) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=5
        )

    def call(self, sock: Path | str, c: ApiCall) -> httpx.Response:
        with self._client(sock) as client:
            resp = client.request(c.method, c.path, json=c.body)
        if resp.status_code >= 300:
            try:
                fault = resp.json().get("fault_message", resp.text)
            except ValueError:
                fault = resp.text
            raise VmError(f"firecracker {c.method} {c.path} -> {resp.status_code}: {fault}")
        return resp

    def boot(self, spec: VmSpec) -> VmRuntime:
        sock = self.api_socket(spec)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        pid = spawn(self.command(spec), cgroup=None if self.jailer_bin else spec.cgroup,
                    log=spec.workdir / "vmm.log", cwd=spec.workdir)  # fmt: skip
        rt = VmRuntime(
            driver=self.name, pid=pid, pid_start=pid_start_time(pid) or 0,
            workdir=str(spec.workdir), log_path=str(spec.log_path), api_socket=str(sock),
            metrics_path=str(self.chroot_root(spec) / "metrics.json"),
            extra={"jailer_dir": str(self.chroot_root(spec).parent) if self.jailer_bin else None},
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not sock.exists():
            if not process_alive(rt.pid, rt.pid_start) or time.monotonic() > deadline:
                self.delete(rt)
                raise VmError("firecracker did not open its API socket")
            time.sleep(0.005)
        try:
            for c in self.plan(spec):
                self.call(sock, c)
        except (VmError, httpx.HTTPError) as exc:
            self.delete(rt)  # the process, its API socket, the jailer's chroot
            raise VmError(f"configuring firecracker failed: {exc}") from exc
        return rt

    def _kill(self, rt: VmRuntime) -> None:
        kill_process(rt.pid, rt.pid_start)

    def stop(self, runtime: VmRuntime, timeout: float) -> None:
        if process_alive(runtime.pid, runtime.pid_start) and runtime.api_socket:
            with contextlib.suppress(VmError, httpx.HTTPError):
                self.call(runtime.api_socket, _action("SendCtrlAltDel"))
            wait_exit(runtime.pid, runtime.pid_start, timeout, poll=0.02)
        self._kill(runtime)

    def delete(self, runtime: VmRuntime) -> None:
        self._kill(runtime)
        if runtime.api_socket:
            Path(runtime.api_socket).unlink(missing_ok=True)
        jail = runtime.extra.get("jailer_dir")
        if jail:
            shutil.rmtree(jail, ignore_errors=True)  # the jailer leaves its chroot behind

    def remove_leftovers(self, vm_id: str) -> None:
        """The jailer's chroot (the rest of a boot is in the VM's jail)."""
        if self.jailer_bin:
            shutil.rmtree(self.chroot_base / "firecracker" / jailer_id(vm_id), ignore_errors=True)

    def inspect(self, runtime: VmRuntime) -> bool:
        alive = process_alive(runtime.pid, runtime.pid_start)
        if not alive:
            reap(runtime.pid)
        return alive

    def stats(self, runtime: VmRuntime, spec: VmSpec) -> VmStats:
        rd = wr = 0
        if runtime.api_socket and runtime.metrics_path:
            with contextlib.suppress(VmError, httpx.HTTPError):
                self.call(runtime.api_socket, _action("FlushMetrics"))
            with contextlib.suppress(OSError, ValueError, IndexError):
                last = Path(runtime.metrics_path).read_text().strip().splitlines()[-1]
                block = json.loads(last).get("block", {})
                rd, wr = int(block.get("read_bytes", 0)), int(block.get("write_bytes", 0))
        cpu = mem = 0
        if spec.cgroup is not None:
            cpu, mem = spec.cgroup.cpu_time_ns(), spec.cgroup.memory_bytes()
        return VmStats(cpu, mem, rd, wr)

    def recover(self, runtime: VmRuntime) -> bool:
        if not process_alive(runtime.pid, runtime.pid_start) or not runtime.api_socket:
            return False
        try:
            with self._client(runtime.api_socket) as client:
                info = client.get("/").json()
        except (httpx.HTTPError, ValueError):
            return False
        return bool(info.get("state") == "Running")
