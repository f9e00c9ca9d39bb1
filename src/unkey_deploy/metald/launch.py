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
    health_path: str = "/",
    timeout: float = 120.0,
    progress: Progress | None = None,
) -> Vm:
    """Create, boot and wait until the app answers HTTP on ``health_path``; returns the running
    VM (``vm.url`` is its endpoint). On failure the VM is deleted (its capacity freed) and the
    error — VmError, DeadlineExceeded, ResourceExhausted... — is raised with the VM's log tail.

    ``progress(phase, message, **data)`` gets one event per step (scheduled, booting, running).
    """

    def say(message: str, **data: Any) -> None:
        if progress is not None:
            progress("vm", message, **data)

    vm = api.create_vm(
        CreateVm(deployment_id, customer_id, Path(rootfs), vcpus=vcpus,
                 memory_bytes=memory_bytes, port=port, env=dict(env or {}))
    )  # fmt: skip
    say(f"scheduled {vm.vm_id} on host {vm.host_id}", vm_id=vm.vm_id, host_id=vm.host_id)
    try:
        vm = api.boot(vm.vm_id)
        say(f"booting {vm.vm_id} ({vm.driver or 'remote host'})", vm_id=vm.vm_id)
        vm = api.wait_ready(vm.vm_id, timeout=timeout, path=health_path)
    except UnkeyError:
        with contextlib.suppress(UnkeyError):
            api.delete(vm.vm_id)
        raise
    say(f"{vm.vm_id} is running at {vm.url}", vm_id=vm.vm_id, url=vm.url,
        instance_id=vm.instance_id)  # fmt: skip
    return vm
