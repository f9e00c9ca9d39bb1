"""One call for the orchestration: place, boot and wait for one replica of a deployment."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..core.errors import UnkeyError
from .api import CreateVm, MetaldApi, Vm

Progress = Callable[..., None]


def launch_replica(
    api: MetaldApi,
    *,
    deployment_id: str,
    customer_id: str,
    rootfs: Path,
    vcpus: int,
    memory_bytes: int,
    port: int,
    env: Mapping[str, str] | None = None,
    asset_id: str | None = None,
    health_path: str = "/",
    health_port: int | None = None,
    timeout: float = 120.0,
    progress: Progress | None = None,
) -> Vm:
    """Create, boot and wait until the app answers HTTP on ``health_path`` (on ``health_port``,
    default: ``port``; recorded with the VM, so its host checks the same); returns the running
    VM (``vm.url`` is its endpoint). With ``asset_id`` (the asset ``rootfs`` comes from) the
    VM holds a lease on the asset until it is deleted (the scheduler needs ``leases``). On
    failure the VM is deleted (its capacity freed) and the error — VmError, DeadlineExceeded,
    ResourceExhausted... — is raised with the VM's log tail.

    ``progress(phase, message, **data)`` gets one event per step: phase ``vm`` for scheduled,
    booting and running, phase ``health`` when the health check starts (what it checks).
    """

    def say(message: str, **data: Any) -> None:
        if progress is not None:
            progress("vm", message, **data)

    vm = api.create_vm(
        CreateVm(deployment_id, customer_id, Path(rootfs), vcpus=vcpus,
                 memory_bytes=memory_bytes, port=port, env=dict(env or {}), asset_id=asset_id,
                 health_path=health_path, health_port=health_port)
    )  # fmt: skip
    say(f"scheduled {vm.vm_id} on host {vm.host_id}", vm_id=vm.vm_id, host_id=vm.host_id)
    try:
        vm = api.boot(vm.vm_id)
        say(f"booting {vm.vm_id} ({vm.driver or 'remote host'})", vm_id=vm.vm_id)
        if progress is not None:
            progress(
                "health",
                f"health check: GET {health_path} on port {health_port or port} of {vm.vm_id}"
                f" until it answers with a status below 500 (up to {timeout:.0f} s)",
                vm_id=vm.vm_id, path=health_path, port=health_port or port, timeout_s=timeout,
            )  # fmt: skip
        vm = api.wait_ready(vm.vm_id, timeout=timeout)
    except UnkeyError:
        with contextlib.suppress(UnkeyError):
            api.delete(vm.vm_id)
        raise
    say(f"{vm.vm_id} is running at {vm.url}", vm_id=vm.vm_id, url=vm.url,
        instance_id=vm.instance_id)  # fmt: skip
    return vm
