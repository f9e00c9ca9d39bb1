"""What the deploy workflow needs from the other services, as small Protocols."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Progress = Callable[..., None]
"""``progress(phase, message, **data)``: append one event to the deployment's stream.

Build progress travels as ``data["progress"]`` (builderd's ``BuildProgress.as_dict()``: item,
done, total, unit, detail) with the record's readable form as the message; clients draw bars
from it and show every other event as a line."""


@dataclass(frozen=True)
class DeployRequest:
    """An accepted, enriched deployment as gatewayd enqueued it."""

    deployment_id: str
    customer_id: str
    tenant_id: str
    request_id: str
    name: str
    image: str
    vcpus: int
    memory_bytes: int
    port: int | None
    env: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None  # replaces the image's ENTRYPOINT (and its CMD)
    args: tuple[str, ...] | None = None  # replaces the image's CMD
    keep_shell: bool = False
    replicas: int = 1
    healthcheck_path: str = "/"


@dataclass(frozen=True)
class BuiltAsset:
    asset_id: str
    build_id: str
    rootfs_bytes: int
    cached: bool


@dataclass(frozen=True)
class LaunchedVm:
    vm_id: str
    instance_id: str
    host_id: str
    url: str | None


class Builds(Protocol):
    """builderd, as the workflow sees it."""

    def build(self, req: DeployRequest, progress: Progress, /) -> BuiltAsset:
        """Build (or reuse) the rootfs asset for ``req.image``; raises core.errors.BuildFailed."""
        ...


class Vms(Protocol):
    """metald (through its scheduler), as the workflow sees it."""

    def launch(
        self, req: DeployRequest, asset: BuiltAsset, replica: int, progress: Progress, /
    ) -> LaunchedVm:
        """Place, prepare, boot one replica and wait until its app answers."""
        ...

    def stop_all(self, deployment_id: str, progress: Progress, /) -> list[str]:
        """Delete every VM of the deployment and wait until each is gone (its host stopped it,
        freed everything it held and released its asset lease); returns the deleted VMs' ids.
        Idempotent: VMs already being deleted are waited for, deleted ones are skipped. A VM
        lost with its host is marked for deletion (never replaced) but not waited for. Raises
        DeadlineExceeded (retryable) when a VM is still there at the deadline."""
        ...


class Deployments(Protocol):
    """The control plane's record of a deployment."""

    def set_state(self, deployment_id: str, state: str, /, **fields: Any) -> None: ...

    def event(self, deployment_id: str, phase: str, message: str, /, **data: Any) -> None: ...
