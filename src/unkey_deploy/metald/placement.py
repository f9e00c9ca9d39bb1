"""Choosing a host for a VM: pure functions, data in, data out (no I/O, no clock).

Rules, in order:
1. A host is *feasible* when it is schedulable and its free vCPUs and memory cover the request.
2. Spread: among feasible hosts, prefer the ones running the fewest replicas of the same
   deployment (so one host failing takes down as few replicas as possible).
3. Bin-pack: among those, prefer the host left with the least free capacity after placement
   (best fit, CPU and memory each as a fraction of the host), keeping big holes for big VMs.
4. Ties break by host id, so the answer is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..core.errors import ResourceExhausted


@dataclass(frozen=True)
class HostView:
    """One host's capacity and what is already placed on it."""

    host_id: str
    cpus: int
    memory_bytes: int
    used_cpus: int = 0
    used_memory_bytes: int = 0
    replicas: Mapping[str, int] = field(default_factory=dict)  # deployment_id -> VMs
    schedulable: bool = True

    @property
    def free_cpus(self) -> int:
        return self.cpus - self.used_cpus

    @property
    def free_memory_bytes(self) -> int:
        return self.memory_bytes - self.used_memory_bytes


@dataclass(frozen=True)
class PlacementRequest:
    deployment_id: str
    vcpus: int
    memory_bytes: int


def _fits(req: PlacementRequest, h: HostView) -> bool:
    return h.schedulable and h.free_cpus >= req.vcpus and h.free_memory_bytes >= req.memory_bytes


def _score(req: PlacementRequest, h: HostView) -> tuple[int, float, str]:
    left_cpu = (h.free_cpus - req.vcpus) / h.cpus if h.cpus else 0.0
    left_mem = (h.free_memory_bytes - req.memory_bytes) / h.memory_bytes if h.memory_bytes else 0.0
    return (h.replicas.get(req.deployment_id, 0), left_cpu + left_mem, h.host_id)


def place(req: PlacementRequest, hosts: Sequence[HostView]) -> str:
    """The host id for ``req``; raises ResourceExhausted naming the shortfall when none fits."""
    if req.vcpus < 1 or req.memory_bytes < 1:
        raise ValueError("a VM needs at least one vCPU and some memory")
    feasible = [h for h in hosts if _fits(req, h)]
    if not feasible:
        best_cpu = max((h.free_cpus for h in hosts if h.schedulable), default=0)
        best_mem = max((h.free_memory_bytes for h in hosts if h.schedulable), default=0)
        raise ResourceExhausted(
            f"no host can fit {req.vcpus} vCPU / {req.memory_bytes} bytes "
            f"({len(hosts)} hosts; most free: {best_cpu} vCPU, {best_mem} bytes)",
            suggestion="add metald hosts or ask for fewer vCPUs / less memory",
        )
    return min(feasible, key=lambda h: _score(req, h)).host_id


def with_placed(h: HostView, req: PlacementRequest) -> HostView:
    """``h`` after ``req`` is placed on it."""
    replicas = dict(h.replicas)
    replicas[req.deployment_id] = replicas.get(req.deployment_id, 0) + 1
    return replace(
        h,
        used_cpus=h.used_cpus + req.vcpus,
        used_memory_bytes=h.used_memory_bytes + req.memory_bytes,
        replicas=replicas,
    )


def place_many(reqs: Sequence[PlacementRequest], hosts: Sequence[HostView]) -> list[str]:
    """Place several VMs one after the other, each seeing the previous placements."""
    views = {h.host_id: h for h in hosts}
    out = []
    for req in reqs:
        hid = place(req, list(views.values()))
        views[hid] = with_placed(views[hid], req)
        out.append(hid)
    return out
