"""What the deploy workflow needs from the other services, as small Protocols."""

from __future__ import annotations

import threading
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
    healthcheck_port: int | None = None  # None: the app's port


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
        """Build (or reuse) the rootfs asset for ``req.image``; raises core.errors.BuildFailed.

        Every progress event of the build carries its ``build_id`` in ``data`` (the first one
        right after the build is queued), so the deploy can cancel it."""
        ...

    def cancel(self, build_id: str, deployment_id: str, /) -> bool:
        """Ask builderd to stop ``build_id`` if it is still queued or running and was
        submitted for ``deployment_id`` only (never a build another deployment waits for);
        True if a cancel was requested. A :meth:`build` waiting for it then returns its
        error at once (queued) or once the build's worker notices (running). Idempotent."""
        ...


class Vms(Protocol):
    """metald (through its scheduler), as the workflow sees it."""

    def launch(
        self, req: DeployRequest, asset: BuiltAsset, replica: int, progress: Progress, /
    ) -> LaunchedVm:
        """Place, prepare, boot one replica and wait until its app answers."""
        ...

    def abort(self, deployment_id: str, /) -> list[str]:
        """Ask for every VM of the deployment to be deleted, without waiting: a :meth:`launch`
        waiting for one of them then fails soon (its VM is gone). Returns the VMs asked for.
        Safe to call from another thread than the launch, and again (a VM created since is
        asked for too)."""
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


class Interrupted(Exception):
    """The user stopped the deployment while its deploy ran; raised at the deploy's next step
    (or when its own move of the deployment is refused: the deployment is no longer its)."""


class Interruption:
    """A user's stop reaching a running deploy, shared by the worker's watcher thread (it calls
    :meth:`set` once the job's ``cancel_requested`` appears) and the workflow (it calls
    :meth:`check` at every step, and records in ``build_id`` the build it waits for).

    ``requested`` asks the source of truth (the job row) without waiting for the watcher's next
    look: the workflow calls it through :meth:`confirmed` before recording a failure, since a
    step that failed because the deployment was being torn down is a stop, not a failure."""

    def __init__(self, requested: Callable[[], bool] = lambda: False) -> None:
        self._event = threading.Event()
        self._requested = requested
        self.build_id: str | None = None

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def confirmed(self) -> bool:
        if not self._event.is_set() and self._requested():
            self._event.set()
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Interrupted("the deployment was stopped")
