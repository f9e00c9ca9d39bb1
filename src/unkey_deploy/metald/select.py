"""Picking the VM driver at start-up by trial (never by the mere existence of /dev/kvm)."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import Unavailable
from .drivers.base import DriverCapabilities, VmDriver
from .drivers.firecracker import FirecrackerDriver
from .drivers.qemu import QemuDriver
from .drivers.sandbox import SandboxDriver
from .kernel import KernelPaths

AUTO_ORDER = ("firecracker", "qemu", "sandbox")


def make_driver(
    name: str, kernel: KernelPaths | None, state_dir: Path, *, runas_user: str
) -> VmDriver:
    if name == "qemu":
        return QemuDriver(kernel, state_dir, runas_user=runas_user)
    if name == "firecracker":
        return FirecrackerDriver(kernel, state_dir)
    if name == "sandbox":
        return SandboxDriver()
    raise Unavailable(f"unknown VM driver {name!r}")


def select_driver(
    wanted: str, kernel: KernelPaths | None, state_dir: Path, *, runas_user: str = "nobody"
) -> tuple[VmDriver, dict[str, DriverCapabilities]]:
    """The driver to use and every candidate's trial result (for ``capabilities/status``).

    ``wanted`` is ``auto`` (the first of firecracker, qemu, sandbox whose trial succeeds) or a
    driver name, which must then be available here.
    """
    names = AUTO_ORDER if wanted == "auto" else (wanted,)
    report: dict[str, DriverCapabilities] = {}
    chosen: VmDriver | None = None
    for name in names:
        drv = make_driver(name, kernel, state_dir, runas_user=runas_user)
        caps = drv.capabilities()
        report[name] = caps
        if caps.available and chosen is None:
            chosen = drv
            break
    if chosen is None:
        why = "; ".join(f"{n}: {c.reason}" for n, c in report.items())
        raise Unavailable(
            f"no usable VM driver ({why})",
            suggestion="install qemu-system-x86 and run `make native`, or install bubblewrap",
        )
    return chosen, report


def probe_drivers(
    kernel: KernelPaths | None, state_dir: Path, *, runas_user: str = "nobody"
) -> dict[str, DriverCapabilities]:
    """Every driver's trial result on this host (for ``unkey dev status`` without a Metald)."""
    return {
        name: make_driver(name, kernel, state_dir, runas_user=runas_user).capabilities()
        for name in AUTO_ORDER
    }
