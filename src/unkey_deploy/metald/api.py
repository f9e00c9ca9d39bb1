"""metald's interface for other services (import from here, not from the internals).

* :class:`Scheduler` — cluster-wide: place and record VMs, ask for boot/stop/delete, read them,
  wait for them; list the hosts (``hosts``) and forget a lost one (``forget_host``). Needs only
  the control-plane database (and the asset manager, to release a forgotten VM's lease).
* :class:`Metald` — one host's agent (a Scheduler that also boots, stops and watches the VMs of
  its own host, reports ``status()`` and ``meter_targets()``).
* :func:`read_consoles` — the consoles of a deployment's VMs (for ``unkey logs``).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..metering.model import MeterTarget
from .console import Console, read_consoles
from .service import CreateVm, Metald, Scheduler, Vm
from .states import VmState

__all__ = [
    "Console", "CreateVm", "Metald", "MetaldApi", "Scheduler", "Vm", "VmState", "read_consoles",
]  # fmt: skip


class MetaldApi(Protocol):
    """What the orchestration calls (both :class:`Metald` and :class:`Scheduler` offer it,
    except ``status``/``meter_targets`` which are per host)."""

    def create_vm(self, req: CreateVm) -> Vm: ...
    def boot(self, vm_id: str) -> Vm: ...
    def stop(self, vm_id: str) -> Vm: ...
    def delete(self, vm_id: str) -> None: ...
    def get(self, vm_id: str) -> Vm: ...
    def list(self, *, host_id: str | None = None, deployment_id: str | None = None) -> list[Vm]: ...
    def wait_ready(self, vm_id: str, timeout: float = 60.0, path: str | None = None) -> Vm: ...
    def endpoint(self, vm_id: str) -> str: ...


class HostAgent(MetaldApi, Protocol):
    def status(self) -> dict[str, Any]: ...
    def meter_targets(self) -> list[MeterTarget]: ...
