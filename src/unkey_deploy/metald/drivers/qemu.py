"""The ``qemu`` driver: ``qemu-system-x86_64 -M microvm`` with virtio-mmio disk and net.

* Accelerator: KVM only when a trial boot of our kernel reaches the initramfs (on hosts like our
  CI, ``/dev/kvm`` answers but cannot boot a stock guest), TCG otherwise. Under TCG the kernel
  gets ``tsc_early_khz=<host TSC>`` or about half the boots hang calibrating the TSC (vm.md §4).
* Serial console goes to ``<jail>/console.log``; QMP (a socket under ``/run/unkey-metald``) is
  used for disk counters (``query-blockstats``) and graceful stop: ``system_powerdown`` presses
  the ACPI power button, our initramfs' watcher sends SIGTERM to the guest's init and powers off
  3 s later (after ``sync``); if the guest is still there after the stop timeout, ``quit``.
* Least privilege: QEMU opens its files (kernel, disk, tap, sockets) as root and then, before
  running the guest, ``-chroot``s into the VM's jail directory and ``-runas`` the unprivileged
  user (``nobody`` unless configured), under ``-sandbox on`` (seccomp: no obsolete syscalls, no
  privilege elevation, no spawning, no resource control). The TCG translation cache is capped
  so the memory cgroup limit (guest memory + overhead) holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

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
from .qmp import Qmp

QEMU = "qemu-system-x86_64"
TB_SIZE_MIB = 64
# Host memory QEMU needs beyond guest RAM (TCG cache, device model, I/O buffers).
VMM_OVERHEAD_BYTES = (96 + TB_SIZE_MIB) * 1024 * 1024


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz (dmesg "tsc: Detected", else /proc/cpuinfo "cpu MHz")."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["dmesg"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        m = re.search(r"tsc: Detected ([0-9.]+) MHz", out)
        if m:
            return int(float(m.group(1)) * 1000)
    with contextlib.suppress(OSError):
        m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            return int(float(m.group(1)) * 1000)
    return None


def probe_kvm(kernel: KernelPaths, timeout: float = 20.0) -> tuple[bool, str]:
    """Boot our kernel+initramfs under KVM until the initramfs says UNKEY_PROBE_OK."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible"
    with tempfile.TemporaryDirectory(prefix="unkey-kvmprobe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [
            QEMU, "-M", "microvm", "-nodefaults", "-no-user-config", "-accel", "kvm",
            "-cpu", "host", "-m", "128", "-smp", "1",
            "-kernel", str(kernel.bzimage), "-initrd", str(kernel.initramfs),
            "-append", "console=ttyS0 panic=-1 reboot=t quiet unkey.probe",
            "-serial", f"file:{serial}", "-display", "none", "-no-reboot",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
            detail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        except subprocess.TimeoutExpired:
            detail = [f"no answer in {timeout:.0f} s"]
        if serial.exists() and "UNKEY_PROBE_OK" in serial.read_text(errors="replace"):
            return True, "trial boot under KVM reached the initramfs"
        return False, f"trial boot under KVM failed: {detail[0][:200]}"


class QemuDriver:
    """``qemu-system-x86_64 -M microvm``; see the module docstring."""

    name = "qemu"

    def __init__(
        self,
        kernel: KernelPaths | None,
        state_dir: Path,
        *,
        runas_user: str = "nobody",
        accel: str | None = None,
        run_dir: Path | None = None,
    ) -> None:
        self.kernel = kernel
        # unix socket paths must be < 108 bytes: QMP sockets live here, not in the jail
        self.run_dir = run_dir or Path("/run/unkey-metald" if os.geteuid() == 0 else
                                       tempfile.gettempdir())  # fmt: skip
        self.state_dir = Path(state_dir)
        self.runas_user = runas_user
        self._accel = accel
        self._tsc_khz: int | None = None

    # -- capabilities -------------------------------------------------------------------------
    def _probe_accel(self) -> tuple[str, str]:
        if self._accel is not None:
            return self._accel, "configured"
        if self.kernel is None:
            return "none", "guest kernel not prepared"
        cache = self.state_dir / "qemu-accel.json"
        key = f"{os.uname().release}|{self.kernel.version}"
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(cache.read_text())
            if data["key"] == key:
                self._accel = str(data["accel"])
                return self._accel, str(data["reason"])
        ok, reason = probe_kvm(self.kernel)
        self._accel = "kvm" if ok else "tcg"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "accel": self._accel, "reason": reason}))
        return self._accel, reason

    def capabilities(self) -> DriverCapabilities:
        nets = ("tap", "user") if os.geteuid() == 0 else ("user",)
        if shutil.which(QEMU) is None:
            return DriverCapabilities(self.name, False, f"{QEMU} not found", networking=nets)
        if self.kernel is None:
            return DriverCapabilities(
                self.name, False, "guest kernel not prepared (run `make native`)", networking=nets
            )
        accel, reason = self._probe_accel()
        return DriverCapabilities(
            self.name, True, reason, accel=accel, networking=nets, block_stats=True
        )

    @property
    def accel(self) -> str:
        return self._probe_accel()[0]

    def tsc_khz(self) -> int | None:
        if self._tsc_khz is None:
            self._tsc_khz = host_tsc_khz()
        return self._tsc_khz

    # -- lifecycle ----------------------------------------------------------------------------
    def create(self, spec: VmSpec) -> None:
        if spec.kernel is None:
            raise VmError("the qemu driver needs a guest kernel", suggestion="run `make native`")
        spec.workdir.mkdir(parents=True, exist_ok=True)

    def command(self, spec: VmSpec) -> list[str]:
        """The full QEMU command line for ``spec`` (also used by the bench as the baseline)."""
        k = spec.kernel
        if k is None:
            raise VmError("the qemu driver needs a guest kernel", suggestion="run `make native`")
        accel = self.accel
        net = spec.net
        if net.mode == "tap":
            cmdline = guest_cmdline(
                ip=f"{net.guest_ip}/{net.prefix}",
                gw=net.host_ip,
                tsc_khz=self.tsc_khz() if accel == "tcg" else None,
            )
            netdev = f"tap,id=n0,ifname={net.host_iface},script=no,downscript=no"
        elif net.mode == "user":
            cmdline = guest_cmdline(tsc_khz=self.tsc_khz() if accel == "tcg" else None)
            netdev = f"user,id=n0,restrict=off,hostfwd=tcp:127.0.0.1:{net.host_port}-:{spec.port}"
        else:
            raise VmError(f"the qemu driver cannot use {net.mode!r} networking")
        mem_mib = max(64, spec.memory_bytes // (1024 * 1024))
        argv = [
            QEMU, "-name", spec.vm_id, "-M", "microvm", "-nodefaults", "-no-user-config",
            "-accel", f"tcg,tb-size={TB_SIZE_MIB}" if accel == "tcg" else "kvm",
            "-cpu", "max" if accel == "tcg" else "host",
            "-m", str(mem_mib), "-smp", str(spec.vcpus),
            "-kernel", str(k.bzimage), "-initrd", str(k.initramfs), "-append", cmdline,
            "-drive", f"id=root,file={spec.rootfs},format=raw,if=none,cache=writeback",
            "-device", "virtio-blk-device,drive=root",
            "-netdev", netdev,
            "-device", "virtio-net-device,netdev=n0" + (f",mac={net.mac}" if net.mac else ""),
            "-serial", f"file:{spec.log_path}", "-display", "none", "-no-reboot",
            "-qmp", f"unix:{self.qmp_path(spec)},server=on,wait=off",
        ]  # fmt: skip
        dropped = False
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                pwd.getpwnam(self.runas_user)
                argv += ["-chroot", str(spec.workdir), "-runas", self.runas_user]
                dropped = True
        # QEMU 7.2 installs its seccomp filter before -runas calls setuid(), so
        # elevateprivileges=deny kills it with SIGSYS; after -runas the process has no
        # capabilities left, so allowing set*id() cannot gain anything.
        elevate = "allow" if dropped else "deny"
        argv += [
            "-sandbox",
            f"on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny",
        ]
        return argv

    def qmp_path(self, spec: VmSpec) -> Path:
        return self.run_dir / f"{spec.vm_id}.qmp"

    def boot(self, spec: VmSpec) -> VmRuntime:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        qmp_path = self.qmp_path(spec)
        with contextlib.suppress(FileNotFoundError):
            qmp_path.unlink()
        pid = spawn(self.command(spec), cgroup=spec.cgroup, log=spec.workdir / "vmm.log",
                    cwd=spec.workdir)  # fmt: skip
        start = pid_start_time(pid) or 0
        rt = VmRuntime(
            driver=self.name,
            pid=pid,
            pid_start=start,
            workdir=str(spec.workdir),
            log_path=str(spec.log_path),
            qmp_socket=str(qmp_path),
            extra={"accel": self.accel},
        )
        # QEMU is "booted" once its QMP socket answers: the device model is up and the vCPUs run.
        deadline = time.monotonic() + 15
        while True:
            if not process_alive(pid, start):
                reap(pid)
                tail = (spec.workdir / "vmm.log").read_text(errors="replace")[-800:]
                raise VmError(f"qemu exited during start-up: {tail.strip()}")
            with contextlib.suppress(OSError, VmError):
                Qmp(qmp_path, timeout=2).close()
                return rt
            if time.monotonic() > deadline:
                self._kill(rt)
                raise VmError("qemu did not open its QMP socket within 15 s")
            time.sleep(0.01)

    def _kill(self, rt: VmRuntime) -> None:
        kill_process(rt.pid, rt.pid_start)

    def stop(self, runtime: VmRuntime, timeout: float) -> None:
        if not process_alive(runtime.pid, runtime.pid_start):
            reap(runtime.pid)
            return
        if runtime.qmp_socket is None:
            raise VmError(f"qemu VM {runtime.workdir} has no QMP socket recorded")
        deadline = time.monotonic() + timeout
        next_press = 0.0
        while time.monotonic() < deadline and process_alive(runtime.pid, runtime.pid_start):
            # Press the power button again every 2 s: a press that lands before the guest's
            # button driver and watcher are up (early in boot, or on a slow TCG guest) is lost.
            if time.monotonic() >= next_press:
                next_press = time.monotonic() + 2.0
                with (
                    contextlib.suppress(OSError, VmError),
                    Qmp(runtime.qmp_socket, timeout=2) as q,
                ):
                    q.execute("system_powerdown")
            wait_exit(runtime.pid, runtime.pid_start, 0.02, poll=0.02)
        if process_alive(runtime.pid, runtime.pid_start):
            # The guest ignored the power button: ask QEMU to exit (flushes the disk cache).
            with contextlib.suppress(OSError, VmError), Qmp(runtime.qmp_socket, timeout=2) as q:
                q.execute("quit")
            wait_exit(runtime.pid, runtime.pid_start, 2.0)
        self._kill(runtime)

    def delete(self, runtime: VmRuntime) -> None:
        self._kill(runtime)
        if runtime.qmp_socket:
            with contextlib.suppress(FileNotFoundError):
                Path(runtime.qmp_socket).unlink()

    def remove_leftovers(self, vm_id: str) -> None:
        """Nothing: all a boot makes is in the VM's jail."""

    def inspect(self, runtime: VmRuntime) -> bool:
        alive = process_alive(runtime.pid, runtime.pid_start)
        if not alive:
            reap(runtime.pid)
        return alive

    def stats(self, runtime: VmRuntime, spec: VmSpec) -> VmStats:
        rd = wr = 0
        if runtime.qmp_socket:
            with contextlib.suppress(OSError, VmError), Qmp(runtime.qmp_socket, timeout=2) as q:
                for dev in q.execute("query-blockstats") or []:
                    st = dev.get("stats", {})
                    rd += int(st.get("rd_bytes", 0))
                    wr += int(st.get("wr_bytes", 0))
        cpu = mem = 0
        if spec.cgroup is not None:
            cpu, mem = spec.cgroup.cpu_time_ns(), spec.cgroup.memory_bytes()
        else:
            cpu, mem = _proc_cpu_mem(runtime.pid)
        return VmStats(cpu, mem, rd, wr)

    def recover(self, runtime: VmRuntime) -> bool:
        if not process_alive(runtime.pid, runtime.pid_start) or not runtime.qmp_socket:
            return False
        try:
            with Qmp(runtime.qmp_socket, timeout=2) as q:
                status = q.execute("query-status")
        except (OSError, VmError):
            return False
        return bool(status and status.get("running"))


def _proc_cpu_mem(pid: int) -> tuple[int, int]:
    """CPU time (ns) and RSS (bytes) of one process from /proc (when there is no cgroup)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
        rss_pages = int(fields[21])
    except (OSError, ValueError, IndexError):
        return 0, 0
    hz = os.sysconf("SC_CLK_TCK")
    return ticks * 1_000_000_000 // hz, rss_pages * os.sysconf("SC_PAGE_SIZE")
