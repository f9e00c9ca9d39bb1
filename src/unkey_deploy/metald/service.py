"""metald: schedules, jails, boots, watches and tears down VMs on one host.

One ``Metald`` runs per host. All hosts share the control-plane database: each registers its
capacity in ``metald_hosts``; :meth:`Metald.create_vm` (on any host) places the VM with the pure
:func:`placement.place` and records it for the chosen host. Actions on a VM of *this* host run
at once; actions on another host's VM set the VM's ``desired`` state, which that host's
reconciler (:meth:`Metald.reconcile`, run every ``interval`` by :meth:`Metald.start`) carries
out. The lifecycle is the state machine in :mod:`.states`.

Public API (used by the orchestration):
``create_vm``, ``boot``, ``stop``, ``delete``, ``get``, ``list``, ``wait_ready``, ``wait_state``,
``endpoint``, ``console``, ``meter_target``/``meter_targets``, ``status``, ``reconcile``,
``recover``, ``sweep_lost_hosts``, ``hosts``, ``forget_host``.

Assets: a VM created with an ``asset_id`` holds a lease on that asset (holder: the VM id) from
before its row exists until the row is deleted (also by a returning host that forgets a lost
VM; a replacement takes its own lease), so the asset manager never deletes the rootfs of a VM
that exists. Metald takes and releases them through the small :class:`AssetLeases` seam
(``assets.api.Assets`` satisfies it).

Host loss: every host heartbeats (``metald_hosts.heartbeat_at``); any host's reconciler runs
:meth:`Scheduler.sweep_lost_hosts`, which declares a host whose heartbeat is older than
``lost_after_s`` lost, moves its VMs to ``lost`` and places a replacement for each one its owner
wanted running. Placement and the sweep hold the hosts lock (:meth:`Scheduler._lock_hosts`) for
the transaction that reads capacity and records the VM, so two schedulers never overcommit a
host, on SQLite and on PostgreSQL alike.

Forgetting a host: a lost host that will never come back is removed by an operator with
:meth:`Scheduler.forget_host` (``DELETE /v1/hosts/{id}``, ``unkey hosts forget``): its lost VM
rows, their asset leases, its address leases and its row go. Should it come back after all, it
registers as a new host and frees what it still holds of VMs that have no row any more
(:meth:`Metald._free_orphans`, from the local record each booted VM leaves in
``<state_dir>/vms/<vm_id>.json``).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import Engine

from ..core import metrics
from ..core.clock import SYSTEM_CLOCK, Clock
from ..core.config import MetaldConfig
from ..core.errors import (
    Conflict,
    DeadlineExceeded,
    IllegalTransition,
    InvalidInput,
    NotFound,
    Problem,
    ResourceExhausted,
    UnkeyError,
    ValidationFailed,
    VmError,
)
from ..core.ids import (
    CustomerId,
    InstanceId,
    VmId,
    is_id,
    new_host_id,
    new_instance_id,
    new_vm_id,
)
from ..core.log import event
from ..core.log import get as get_logger
from ..core.net import free_port
from ..metering.model import MeterTarget, SeriesKey
from . import models
from .cgroups import CgroupManager, VmCgroup
from .console import compact
from .drivers.base import (
    CONSOLE_LOG,
    DriverCapabilities,
    Launcher,
    NetAttachment,
    VmDriver,
    VmRuntime,
    VmSpec,
)
from .drivers.qemu import VMM_OVERHEAD_BYTES
from .drivers.sandbox import SandboxDriver
from .jail import Jails, inject_env, inject_resolv
from .kernel import KernelPaths, find_kernel
from .network import (
    POOL_PREFIX,
    HostNetwork,
    IpAllocator,
    NetnsPool,
    host_nameservers,
    iface_name,
    netns_name,
)
from .placement import HostView, PlacementRequest, place
from .select import select_driver
from .states import ACTIVE, VmState, check_action, sources, transition

log = get_logger("metald")

# VMs booted, stopped or deleted at once by one host (a stop may wait stop_timeout_s)
VM_WORKERS = 64

# monotonic time each VM's boot began in this process (for the boot-seconds histogram)
_boot_started: dict[str, float] = {}

MIN_MEMORY = 32 * 1024 * 1024
HOST_LOST_AFTER_S = 30.0
# what a VM's row carries over to its replacement
_VM_FIELDS = (
    "deployment_id", "customer_id", "vcpus", "memory_bytes", "port", "rootfs", "env", "asset_id",
    "health_path", "health_port",
)  # fmt: skip


class AssetLeases(Protocol):
    """The part of the asset manager metald uses (``assets.api.Assets`` has it)."""

    def lease(self, asset_id: Any, holder: str, /) -> Any: ...
    def release(self, asset_id: Any, holder: str, /) -> None: ...


@dataclass(frozen=True)
class CreateVm:
    """A request for one VM of a deployment. ``rootfs`` is an ext4 image (``.zst`` accepted);
    ``asset_id`` the asset it is (leased while the VM exists)."""

    deployment_id: str
    customer_id: str
    rootfs: Path
    vcpus: int = 1
    memory_bytes: int = 256 * 1024 * 1024
    port: int = 8080
    env: Mapping[str, str] = field(default_factory=dict)
    asset_id: str | None = None
    # readiness (the app.yaml's healthcheck): GET health_path on health_port (None: ``port``)
    health_path: str = "/"
    health_port: int | None = None

    def validate(self) -> None:
        problems = []
        if not self.deployment_id:
            problems.append(Problem("deployment_id", "is required"))
        if not self.customer_id:
            problems.append(Problem("customer_id", "is required"))
        if not 1 <= self.vcpus <= 64:
            problems.append(Problem("vcpus", "must be between 1 and 64"))
        if self.memory_bytes < MIN_MEMORY:
            problems.append(Problem("memory_bytes", f"must be at least {MIN_MEMORY}"))
        if not 1 <= self.port <= 65535:
            problems.append(Problem("port", "must be between 1 and 65535"))
        if self.health_port is not None and not 1 <= self.health_port <= 65535:
            problems.append(Problem("health_port", "must be between 1 and 65535"))
        if not self.health_path.startswith("/") or any(c.isspace() for c in self.health_path):
            problems.append(Problem("health_path", "must start with '/' and hold no spaces"))
        for k in self.env:
            if not k or "=" in k or "\0" in k:
                problems.append(Problem(f"env.{k}", "is not a valid variable name"))
        if not Path(self.rootfs).is_file():
            problems.append(Problem("rootfs", f"{self.rootfs} is not a file"))
        if problems:
            raise ValidationFailed("invalid VM request", problems)


@dataclass(frozen=True)
class Vm:
    """A VM as recorded by metald."""

    vm_id: VmId
    host_id: str
    deployment_id: str
    customer_id: CustomerId
    state: VmState
    desired: str
    instance_id: InstanceId | None
    vcpus: int
    memory_bytes: int
    port: int
    driver: str | None
    net: NetAttachment | None
    error: str | None
    created_at: float
    updated_at: float
    replaced_by: VmId | None = None
    asset_id: str | None = None
    health_path: str = "/"
    health_port: int | None = None

    @property
    def url(self) -> str | None:
        return self._url(self.port)

    @property
    def health_url(self) -> str | None:
        """Where its readiness is checked (QEMU's user-mode network forwards the app's port
        only: there, the app's port)."""
        return self._url(self.health_port or self.port)

    def _url(self, port: int) -> str | None:
        if self.net is None:
            return None
        host, at = self.net.endpoint(port)
        return f"http://{host}:{at}"


# The boot path's statements, built once: building one costs ~0.1 ms of SQLAlchemy each time,
# five times the database's own work for these one-row statements.
_SELECT_VM = sa.select(models.vms).where(models.vms.c.vm_id == sa.bindparam("p_vm_id"))
_INSERT_VM = models.vms.insert().returning(*models.vms.c)
_SELECT_HOSTS = sa.select(models.hosts)
# what placement counts against each host: every VM not being deleted, summed per host and
# deployment, or per host with one deployment's VMs counted (Scheduler._host_views)
_V = models.vms
_USE_BY_DEPLOYMENT = (
    sa.select(_V.c.host_id, _V.c.deployment_id, sa.func.count(), sa.func.sum(_V.c.vcpus),
              sa.func.sum(_V.c.memory_bytes))
    .where(_V.c.desired != "deleted")
    .group_by(_V.c.host_id, _V.c.deployment_id)
)  # fmt: skip
_USE_BY_HOST = (
    sa.select(
        _V.c.host_id,
        sa.func.sum(sa.case((_V.c.deployment_id == sa.bindparam("p_dep"), 1), else_=0)),
        sa.func.sum(_V.c.vcpus),
        sa.func.sum(_V.c.memory_bytes),
    )
    .where(_V.c.desired != "deleted")
    .group_by(_V.c.host_id)
)
# the hosts lock (see Scheduler._lock_hosts)
_LOCK_HOSTS_PG = (
    sa.select(models.hosts.c.host_id).order_by(models.hosts.c.host_id).with_for_update()
)
_LOCK_HOSTS_SQLITE = (
    models.hosts.update().where(sa.false()).values(schedulable=models.hosts.c.schedulable)
)


@functools.cache
def _vm_update(columns: tuple[str, ...], target: VmState | None = None) -> Any:
    """``UPDATE metald_vms SET <columns>, updated_at`` of one VM (parameters ``p_vm_id``,
    ``p_at`` and ``p_<column>``); with ``target``: also its state, only from a state that may
    move to it, returning the new row (see :meth:`Scheduler._transition`)."""
    t = models.vms
    values: dict[str, Any] = {c: sa.bindparam(f"p_{c}", type_=t.c[c].type) for c in columns}
    values["updated_at"] = sa.bindparam("p_at", type_=t.c.updated_at.type)
    where = [t.c.vm_id == sa.bindparam("p_vm_id")]
    if target is None:
        return t.update().where(*where).values(**values)
    where.append(t.c.state.in_(sources(target)))
    return t.update().where(*where).values(state=str(target), **values).returning(*t.c)


def _to_vm(r: Any) -> Vm:
    return Vm(
        vm_id=VmId(r.vm_id),
        host_id=r.host_id,
        deployment_id=r.deployment_id,
        customer_id=CustomerId(r.customer_id),
        state=VmState(r.state),
        desired=r.desired,
        instance_id=InstanceId(r.instance_id) if r.instance_id else None,
        vcpus=r.vcpus,
        memory_bytes=r.memory_bytes,
        port=r.port,
        driver=r.driver,
        net=NetAttachment(**r.net) if r.net else None,
        error=r.error,
        created_at=r.created_at,
        updated_at=r.updated_at,
        replaced_by=VmId(r.replaced_by) if r.replaced_by else None,
        asset_id=r.asset_id,
        health_path=r.health_path or "/",
        health_port=r.health_port,
    )


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 1 << 30


class Scheduler:
    """The cluster-wide part of metald, usable from any process with the database: places VMs
    on registered hosts and records what their owners want; each host's :class:`Metald`
    carries it out. :class:`Metald` extends it with the host-local work."""

    host_id: str | None = None

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock = SYSTEM_CLOCK,
        lost_after_s: float = HOST_LOST_AFTER_S,
        leases: AssetLeases | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.lost_after_s = lost_after_s
        self.leases = leases
        self._lock = threading.RLock()

    def host_views(self) -> list[HostView]:
        with self.engine.connect() as c:
            return self._host_views(c)

    def _live(self, h: Any, now: float) -> bool:
        fresh = now - h.heartbeat_at < self.lost_after_s
        return bool(h.schedulable) and h.lost_at is None and fresh

    def _host_views(self, c: sa.Connection, deployment_id: str | None = None) -> list[HostView]:
        """Every host with what its VMs use, summed by the database (one row per host and
        deployment, or per host when ``deployment_id`` is given: then ``replicas`` counts that
        deployment's VMs only, all a placement reads), not one row per VM."""
        now = self.clock.now().timestamp()
        hosts = c.execute(_SELECT_HOSTS).all()
        used: dict[str, list[int]] = {}
        reps: dict[str, dict[str, int]] = {}
        if deployment_id is None:
            for host, dep, n, cpus, mem in c.execute(_USE_BY_DEPLOYMENT):
                u = used.setdefault(host, [0, 0])
                u[0] += int(cpus)
                u[1] += int(mem)
                reps.setdefault(host, {})[dep] = int(n)
        else:
            for host, n_dep, cpus, mem in c.execute(_USE_BY_HOST, {"p_dep": deployment_id}):
                used[host] = [int(cpus), int(mem)]
                if n_dep:
                    reps[host] = {deployment_id: int(n_dep)}
        return [
            HostView(
                host_id=h.host_id,
                cpus=h.cpus,
                memory_bytes=h.memory_bytes,
                used_cpus=used.get(h.host_id, [0, 0])[0],
                used_memory_bytes=used.get(h.host_id, [0, 0])[1],
                replicas=reps.get(h.host_id, {}),
                schedulable=self._live(h, now),
            )
            for h in hosts
        ]

    def _lock_hosts(self, c: sa.Connection) -> None:
        """Serialise placements: call first in the transaction that reads capacity and records
        VMs. PostgreSQL: row locks on every host (in host id order, so two lockers cannot
        deadlock). SQLite: a write statement takes the database's write lock at once (a read
        would not, and pysqlite only opens the transaction at the first write)."""
        if c.dialect.name == "postgresql":
            c.execute(_LOCK_HOSTS_PG)
        else:
            c.execute(_LOCK_HOSTS_SQLITE)

    def hosts(self) -> list[dict[str, Any]]:
        """Every registered host with its driver, capacity, use and driver trial results (what
        ``unkey dev status`` shows; works from any process that has the database)."""
        views = {v.host_id: v for v in self.host_views()}
        v = models.vms
        with self.engine.connect() as c:
            rows = c.execute(sa.select(models.hosts).order_by(models.hosts.c.name)).all()
            per_state = c.execute(
                sa.select(v.c.host_id, v.c.state, sa.func.count()).group_by(v.c.host_id, v.c.state)
            ).all()
        counts: dict[str, dict[str, int]] = {}
        for host_id, state, n in per_state:
            counts.setdefault(host_id, {})[state] = int(n)
        return [
            {
                "host_id": r.host_id,
                "name": r.name,
                "driver": r.driver,
                "cpus": r.cpus,
                "memory_bytes": r.memory_bytes,
                "used_cpus": views[r.host_id].used_cpus,
                "used_memory_bytes": views[r.host_id].used_memory_bytes,
                "schedulable": views[r.host_id].schedulable,
                "heartbeat_at": r.heartbeat_at,
                "lost_at": r.lost_at,
                "drivers": r.capabilities,
                "vms": counts.get(r.host_id, {}),
            }
            for r in rows
        ]

    def forget_host(self, host_id: str) -> dict[str, Any]:
        """Remove a lost host that is never coming back: its VM rows (all ``lost``), their
        asset leases (so the asset store may collect those rootfs blobs), its address leases
        and its row. Returns what was removed.

        Only a host declared lost (``lost_at`` set) can be forgotten: a live or merely late host
        is a Conflict, and so is a lost host with a lost VM still waiting for its replacement
        (forgetting it would drop a replica its owner wants running). An unknown host (or one
        forgotten already) is NotFound. If the host does come back, it registers as a new host
        and frees what it still runs of the forgotten VMs (see the module docstring)."""
        t, v = models.hosts, models.vms
        with self.engine.connect() as c:
            h = c.execute(sa.select(t).where(t.c.host_id == host_id)).first()
            vms = c.execute(sa.select(v).where(v.c.host_id == host_id)).all()
        self._check_forgettable(host_id, h, vms)
        # the leases first, outside the transaction (on SQLite the asset manager's write would
        # wait for our lock) and before the rows go, so a failure here leaves everything for a
        # retry; a lost VM is never booted again, so nothing reads its rootfs any more
        released = self._release_leases(vms)
        with self.engine.begin() as c:
            self._lock_hosts(c)
            h = c.execute(sa.select(t).where(t.c.host_id == host_id)).first()
            vms = c.execute(sa.select(v).where(v.c.host_id == host_id)).all()
            h = self._check_forgettable(host_id, h, vms)  # it may have come back meanwhile
            c.execute(v.delete().where(v.c.host_id == host_id))
            ips = c.execute(
                models.ip_leases.delete().where(models.ip_leases.c.host_id == host_id)
            ).rowcount
            c.execute(t.delete().where(t.c.host_id == host_id))
        # a VM recorded on it between our two reads (none is placed on a lost host): after the
        # commit, like the leases of replacements in sweep_lost_hosts
        released.update(self._release_leases([r for r in vms if r.vm_id not in released]))
        forgotten = sorted(str(r.vm_id) for r in vms)
        event(log, "host forgotten", logging.WARNING, host_id=host_id, name=h.name,
              vms=len(forgotten), asset_leases=len(released))  # fmt: skip
        return {
            "host_id": host_id,
            "name": h.name,
            "vms": forgotten,
            "asset_leases_released": len([a for a in released.values() if a]),
            "ip_leases_released": int(ips or 0),
        }

    def _check_forgettable(self, host_id: str, h: Any, vms: Any) -> Any:
        """``h`` (the host's row) if the host may be forgotten; else the error why not."""
        if h is None:
            raise NotFound(
                f"host {host_id} not found",
                suggestion="`unkey hosts ls` lists the registered hosts",
            )
        age = self.clock.now().timestamp() - h.heartbeat_at
        if h.lost_at is None:
            live = age < self.lost_after_s
            raise Conflict(
                f"host {h.name} ({host_id}) is {'live' if live else 'late but not lost yet'}: "
                f"its last heartbeat is {age:.1f} s old; only a lost host can be forgotten",
                suggestion="to retire a running host, stop its metald with SIGUSR1 (its VMs "
                "are deleted and it deregisters); a host that is gone is declared lost once its "
                "heartbeat is older than metald.host_lost_after_s, and can be forgotten then",
                details={"host_id": host_id, "heartbeat_age_s": round(age, 1)},
            )
        waiting = [
            r.vm_id for r in vms
            if r.state == str(VmState.LOST) and r.desired == "running" and r.replaced_by is None
        ]  # fmt: skip
        if waiting:
            raise Conflict(
                f"host {h.name} ({host_id}) has {len(waiting)} lost VM(s) still waiting for a "
                f"replacement: {', '.join(waiting[:10])}",
                suggestion="add capacity (the next sweep places their replacements) or stop "
                "their deployments, then forget the host",
                details={"host_id": host_id, "vms": waiting},
            )
        if self.leases is None and any(r.asset_id for r in vms):
            raise VmError(
                f"host {host_id} has VMs holding asset leases but this scheduler has no asset "
                "manager to release them with"
            )
        return h

    def _release_leases(self, vms: Any) -> dict[str, str | None]:
        """Release each VM row's asset lease; returns vm id -> asset id (None: it had none)."""
        out: dict[str, str | None] = {}
        for r in vms:
            self._release_lease(r.asset_id, r.vm_id)
            out[str(r.vm_id)] = r.asset_id
        return out

    # -- queries -------------------------------------------------------------------------------
    def get(self, vm_id: str) -> Vm:
        return _to_vm(self._row(vm_id))

    def _row(self, vm_id: str) -> Any:
        with self.engine.connect() as c:
            r = c.execute(_SELECT_VM, {"p_vm_id": vm_id}).first()
        if r is None:
            raise NotFound(f"VM {vm_id} not found")
        return r

    def list(self, *, host_id: str | None = None, deployment_id: str | None = None) -> list[Vm]:
        q = sa.select(models.vms).order_by(models.vms.c.created_at)
        if host_id:
            q = q.where(models.vms.c.host_id == host_id)
        if deployment_id:
            q = q.where(models.vms.c.deployment_id == deployment_id)
        with self.engine.connect() as c:
            return [_to_vm(r) for r in c.execute(q)]

    def endpoint(self, vm_id: str) -> str:
        """``http://host:port`` at which the host reaches the VM's app."""
        vm = self.get(vm_id)
        if vm.url is None:
            raise IllegalTransition(f"VM {vm_id} has no endpoint while {vm.state}")
        return vm.url

    # -- state persistence ------------------------------------------------------------------
    def _set_state(self, vm_id: str, target: VmState, **values: Any) -> Vm:
        """Move the VM to ``target`` (legal transitions only) and store ``values`` with it."""
        return _to_vm(self._transition(vm_id, target, **values))

    def _transition(self, vm_id: str, target: VmState, **values: Any) -> Any:
        """:meth:`_set_state`, returning the VM's new row. One ``UPDATE ... RETURNING``: the
        row moves only from a state the machine allows (so of two writers racing, one wins and
        the other gets IllegalTransition); when nothing moved, the row is read to say why."""
        params = {f"p_{k}": v for k, v in values.items()}
        stmt = _vm_update(tuple(sorted(values)), target)
        with self._lock, self.engine.begin() as c:
            r = c.execute(
                stmt, {**params, "p_vm_id": vm_id, "p_at": self.clock.now().timestamp()}
            ).first()
        if r is None:
            now = self._row(vm_id)  # NotFound when there is no such VM
            transition(vm_id, VmState(now.state), target)  # IllegalTransition from here
            raise IllegalTransition(  # moved to a legal source state since our write
                f"VM {vm_id} changed state concurrently; {now.state} -> {target} not applied"
            )
        event(log, "vm state", vm_id=vm_id, state=str(target), customer_id=r.customer_id,
              deployment_id=r.deployment_id)  # fmt: skip
        if target == VmState.PREPARING:
            _boot_started[vm_id] = time.monotonic()
        elif target == VmState.RUNNING:
            t0 = _boot_started.pop(vm_id, None)
            if t0 is not None:
                metrics.VM_BOOT_SECONDS.observe(time.monotonic() - t0)
                metrics.VM_BOOTS.labels("ok").inc()
        elif target == VmState.FAILED and _boot_started.pop(vm_id, None) is not None:
            metrics.VM_BOOTS.labels("failed").inc()
        return r

    def _update(self, vm_id: str, **values: Any) -> None:
        params = {f"p_{k}": v for k, v in values.items()}
        with self.engine.begin() as c:
            c.execute(
                _vm_update(tuple(sorted(values))),
                {**params, "p_vm_id": vm_id, "p_at": self.clock.now().timestamp()},
            )

    # -- actions ------------------------------------------------------------------------------
    def create_vm(self, req: CreateVm) -> Vm:
        """Validate, place on a host, and record the VM as ``pending`` (not booted yet)."""
        req.validate()
        vm_id = new_vm_id()
        # the lease first (outside the placement transaction: on SQLite the asset manager's
        # write would wait for our lock), so no VM row ever names an unleased asset
        self._lease(req.asset_id, vm_id)
        try:
            with self.engine.begin() as c:
                self._lock_hosts(c)
                fields = {
                    "deployment_id": req.deployment_id, "customer_id": req.customer_id,
                    "vcpus": req.vcpus, "memory_bytes": req.memory_bytes, "port": req.port,
                    "rootfs": str(Path(req.rootfs).resolve()), "env": dict(req.env),
                    "asset_id": req.asset_id, "health_path": req.health_path,
                    "health_port": req.health_port,
                }  # fmt: skip
                row = self._place_and_insert(c, fields, desired="stopped", vm_id=vm_id)
        except BaseException:
            self._release_lease(req.asset_id, vm_id)
            raise
        event(log, "vm created", vm_id=vm_id, host_id=row.host_id,
              deployment_id=req.deployment_id)  # fmt: skip
        return _to_vm(row)

    def _lease(self, asset_id: str | None, vm_id: str) -> None:
        if asset_id is None:
            return
        if self.leases is None:
            raise VmError(
                f"VM {vm_id} names asset {asset_id} but this metald has no asset manager to"
                " lease it from"
            )
        self.leases.lease(asset_id, vm_id)

    def _release_lease(self, asset_id: str | None, vm_id: str) -> None:
        if asset_id is None:
            return
        if self.leases is None:
            event(log, "asset lease not released", logging.ERROR, vm_id=vm_id,
                  asset_id=asset_id, error="this metald has no asset manager")  # fmt: skip
            return
        self.leases.release(asset_id, vm_id)

    def _place_and_insert(
        self, c: sa.Connection, vm: Mapping[str, Any], *, desired: str, vm_id: VmId
    ) -> Any:
        """Place and record one VM (``vm``: deployment_id, customer_id, vcpus, memory_bytes,
        port, rootfs, env) inside the caller's transaction, which holds the hosts lock, so the
        capacity read here is still true when the row lands. Returns the row."""
        req = PlacementRequest(vm["deployment_id"], vm["vcpus"], vm["memory_bytes"])
        host = place(req, self._host_views(c, req.deployment_id))
        now = self.clock.now().timestamp()
        return c.execute(
            _INSERT_VM,
            dict(vm_id=vm_id, host_id=host, state=str(VmState.PENDING), desired=desired,
                 created_at=now, updated_at=now, **{k: vm[k] for k in _VM_FIELDS}),
        ).one()  # fmt: skip

    # -- host loss ----------------------------------------------------------------------------
    def sweep_lost_hosts(self) -> builtins.list[tuple[VmId, VmId | None]]:
        """Declare every host whose heartbeat is older than ``lost_after_s`` lost: its VMs
        become ``lost`` and each one whose owner wants it running gets a replacement VM placed
        on a live host (booted by that host's reconciler: a new instance, a new metering
        series). A lost VM whose replacement did not fit yet is retried on the next sweep.
        Returns ``(lost vm, replacement or None)`` for what this sweep did."""
        now = self.clock.now().timestamp()
        t, v = models.hosts, models.vms
        with self.engine.connect() as c:  # cheap check first: most sweeps find nothing
            stale = c.execute(
                sa.select(t.c.host_id).where(
                    t.c.lost_at.is_(None), t.c.heartbeat_at < now - self.lost_after_s
                )
            ).first()
            orphans = c.execute(
                sa.select(v.c.vm_id).where(
                    v.c.state == str(VmState.LOST), v.c.desired == "running",
                    v.c.replaced_by.is_(None),
                )
            ).first()  # fmt: skip
        if stale is None and orphans is None:
            return []
        done: builtins.list[tuple[VmId, VmId | None]] = []
        lost_hosts: builtins.list[str] = []
        leases: builtins.list[tuple[str, VmId]] = []
        with self.engine.begin() as c:
            self._lock_hosts(c)
            for h in c.execute(
                sa.select(t).where(
                    t.c.lost_at.is_(None), t.c.heartbeat_at < now - self.lost_after_s
                )
            ).all():
                c.execute(t.update().where(t.c.host_id == h.host_id).values(lost_at=now))
                lost_hosts.append(h.host_id)
                for r in c.execute(sa.select(v).where(v.c.host_id == h.host_id)).all():
                    if r.state == str(VmState.LOST):
                        continue
                    c.execute(
                        v.update().where(v.c.vm_id == r.vm_id).values(
                            state=str(VmState.LOST), updated_at=now,
                            error=f"host {h.name} ({h.host_id}) stopped heartbeating "
                            f"{now - h.heartbeat_at:.1f} s ago",
                        )
                    )  # fmt: skip
                    event(log, "vm lost", logging.WARNING, vm_id=r.vm_id, host_id=h.host_id,
                          customer_id=r.customer_id, deployment_id=r.deployment_id,
                          was=r.state)  # fmt: skip
            for r in c.execute(
                sa.select(v).where(
                    v.c.state == str(VmState.LOST), v.c.desired == "running",
                    v.c.replaced_by.is_(None),
                ).order_by(v.c.created_at)
            ).all():  # fmt: skip
                new_id = new_vm_id()
                try:
                    host = self._place_and_insert(
                        c, dict(r._mapping), desired="running", vm_id=new_id
                    ).host_id
                except ResourceExhausted as exc:
                    event(log, "vm not rescheduled", logging.WARNING, vm_id=r.vm_id,
                          error=str(exc))  # fmt: skip
                    done.append((VmId(r.vm_id), None))
                    continue
                # the lost VM no longer counts against its host; that host, if it comes back,
                # frees what the VM held there and deletes the row
                c.execute(
                    v.update().where(v.c.vm_id == r.vm_id)
                    .values(replaced_by=new_id, desired="deleted", updated_at=now)
                )  # fmt: skip
                event(log, "vm rescheduled", vm_id=r.vm_id, replacement=new_id, host_id=host,
                      customer_id=r.customer_id, deployment_id=r.deployment_id)  # fmt: skip
                done.append((VmId(r.vm_id), new_id))
                if r.asset_id:
                    leases.append((r.asset_id, new_id))
        for hid in lost_hosts:
            event(log, "host lost", logging.WARNING, host_id=hid)
        # after the commit (see create_vm); until then the lost VM's lease keeps the asset
        for asset_id, new_id in leases:
            try:
                self._lease(asset_id, new_id)
            except UnkeyError as exc:
                event(log, "asset lease", logging.ERROR, vm_id=new_id, asset_id=asset_id,
                      error=str(exc))  # fmt: skip
        return done

    def current(self, vm_id: str) -> Vm:
        """The VM, or the live replacement of a lost one (following replacements)."""
        vm = self.get(vm_id)
        seen = {vm.vm_id}
        while vm.state == VmState.LOST and vm.replaced_by and vm.replaced_by not in seen:
            vm = self.get(vm.replaced_by)
            seen.add(vm.vm_id)
        return vm

    def boot(self, vm_id: str) -> Vm:
        """Ask for the VM to run (its host boots it)."""
        check_action(vm_id, self.get(vm_id).state, "boot")
        self._update(vm_id, desired="running")
        return self.get(vm_id)

    def stop(self, vm_id: str) -> Vm:
        check_action(vm_id, self.get(vm_id).state, "stop")
        self._update(vm_id, desired="stopped")
        return self.get(vm_id)

    def delete(self, vm_id: str) -> None:
        """Ask for the VM to be deleted (its host stops it first and frees everything)."""
        self.get(vm_id)
        self._update(vm_id, desired="deleted")

    # -- readiness ----------------------------------------------------------------------------
    def probe(self, vm: Vm, timeout: float = 0.5, path: str | None = None) -> bool:
        """One HTTP GET of the VM's readiness check (``path`` on its health port; default: its
        ``health_path``): any HTTP answer below 500 means it is serving."""
        if vm.health_url is None:
            return False
        status = http_status(vm.health_url, path or vm.health_path, connect_timeout=0.1,
                             timeout=timeout)  # fmt: skip
        return status is not None and status < 500

    def _alive(self, vm_id: str) -> bool:
        return True  # only a host can tell; its reconciler marks dead VMs failed

    def wait_ready(self, vm_id: str, timeout: float = 60.0, path: str | None = None) -> Vm:
        """Wait until the app answers its readiness check (``path``, default: the VM's
        ``health_path``, on its health port; then the VM is ``running``); raise VmError when
        it fails, DeadlineExceeded when ``timeout`` passes.

        A local booting VM is probed every half millisecond for the first second (a sandbox app
        listens ~10 ms after its start; a refused connect costs ~50 us); the VM's row (state
        changes by others) and its process are read every 20 ms."""
        start = time.monotonic()
        deadline = start + timeout
        delay = 0.0005
        vm: Vm | None = None
        next_read = start
        while True:
            now = time.monotonic()
            if vm is None or now >= next_read:
                next_read = now + 0.02
                vm = self.get(vm_id)
                # Guest addresses are local to their host: for another host's VM, its agent
                # (which probes from there) says when it runs.
                local = vm.host_id == self.host_id
                if vm.state == VmState.RUNNING and (not local or self.probe(vm, path=path)):
                    return vm
                if vm.state == VmState.FAILED:
                    raise VmError(f"VM {vm_id} failed: {vm.error}")
                if vm.state == VmState.LOST:
                    raise VmError(f"VM {vm_id} was lost with its host: {vm.error}")
                if vm.state == VmState.BOOTING and local and not self._alive(vm_id):
                    self._on_dead(vm_id)
                    vm = None
                    continue
            if vm.state == VmState.BOOTING and local and self.probe(vm, path=path):
                with contextlib.suppress(IllegalTransition):
                    return self._set_state(vm_id, VmState.RUNNING)
                vm = None  # moved meanwhile (stopped, failed...): read it again
                continue
            if now > deadline:
                raise DeadlineExceeded(
                    f"VM {vm_id} not ready within {timeout:.0f} s (state {vm.state})"
                )
            time.sleep(delay)
            # poll tightly for the first second (sandboxes are ready in tens of ms), then back off
            if now - start > 1.0:
                delay = min(delay * 1.5, 0.1)

    def _on_dead(self, vm_id: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release here (a host's metald stops its loops in its own close)."""

    def wait_state(self, vm_id: str, states: set[VmState], timeout: float = 60.0) -> Vm:
        deadline = time.monotonic() + timeout
        while True:
            vm = self.get(vm_id)
            if vm.state in states:
                return vm
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"VM {vm_id} still {vm.state} after {timeout:.0f} s")
            time.sleep(0.05)


class Metald(Scheduler):
    """The metald of one host. See the module docstring."""

    def __init__(
        self,
        config: MetaldConfig,
        engine: Engine,
        state_dir: Path,
        *,
        kernel: KernelPaths | None = None,
        clock: Clock = SYSTEM_CLOCK,
        driver: VmDriver | None = None,
        leases: AssetLeases | None = None,
    ) -> None:
        super().__init__(engine, clock=clock, lost_after_s=config.host_lost_after_s, leases=leases)
        self.config = config
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.root = os.geteuid() == 0
        self.kernel = kernel or (find_kernel(config.kernel_dir) if config.kernel_dir else None)
        self.capabilities: dict[str, DriverCapabilities]
        if driver is None:
            driver, self.capabilities = select_driver(
                config.driver, self.kernel, self.state_dir, runas_user=config.runas_user
            )
        else:
            self.capabilities = {driver.name: driver.capabilities()}
        self.driver: VmDriver = driver
        if isinstance(driver, SandboxDriver):
            driver.image_keep_s = config.image_keep_s
        self.host_id = config.host_id or self._stable_host_id()
        self.host_name = config.host_name or socket.gethostname()
        self.jails = Jails(self.state_dir / "jails")
        self.cgroups = CgroupManager(parent_name=f"unkey-metald-{self._tag()}")
        if config.cgroup_favordynmods:
            event(log, "cgroup favordynmods", state=self.cgroups.favor_dynmods())
        self.ips = IpAllocator(engine, self.host_id, config.subnet)
        # the guests' name servers (NAT'd links only: user-mode QEMU has its own, see _dns)
        self.guest_dns = host_nameservers() if config.guest_dns is None else config.guest_dns
        # for guests on the host's own network (the sandbox without root): the host's resolvers
        # as they are, local stubs included (the same loopback)
        self.host_net_dns = (
            host_nameservers(host_network=True) if config.guest_dns is None else config.guest_dns
        )
        self.network = (
            HostNetwork(
                config.subnet,
                table=f"unkey_{self._tag()}",
                egress_deny=config.egress_deny,
                egress_allow=config.egress_allow,
                dns=self.guest_dns,
            )
            if self.root
            else None
        )
        self._stop_evt = threading.Event()
        # VMs whose boot/stop/delete runs off the reconcile pass (see _in_background)
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._work: set[Future[None]] = set()
        self._workers = ThreadPoolExecutor(max_workers=VM_WORKERS,
                                           thread_name_prefix="metald-vm")  # fmt: skip
        self._last_heartbeat = self.clock.monotonic()
        self._last_sweep = self.clock.monotonic()
        self._last_compact = self._last_sweep
        self._not_compacted: set[str] = set()  # VMs whose log cannot be (logged once)
        self._thread: threading.Thread | None = None
        self.netns_pool: NetnsPool | None = None
        if self.network is not None:
            self.network.setup()
            pool = NetnsPool(self.network, self.ips, config.netns_pool,
                             record_dir=self.state_dir / "netns-pool", warm=self._warm)  # fmt: skip
            pool.reclaim()  # spares of a metald of this host that died
            for stale in self.jails.root.glob(f"{POOL_PREFIX}*.log"):  # their launchers' logs
                stale.unlink(missing_ok=True)
            if self.driver.name == "sandbox" and config.netns_pool > 0:
                self.netns_pool = pool
        self.register()
        self.recover()
        if self.netns_pool is not None:
            self.netns_pool.start()

    # -- identity & registration ------------------------------------------------------------
    def _stable_host_id(self) -> str:
        f = self.state_dir / "host_id"
        if f.exists():
            return f.read_text().strip()
        hid = new_host_id()
        f.write_text(hid)
        return hid

    def _tag(self) -> str:
        """Short name for this metald's host-global objects (nft tables, cgroup parent)."""
        return hashlib.sha1(
            f"{self.host_id}|{self.config.subnet}".encode(), usedforsecurity=False
        ).hexdigest()[:8]

    def capacity(self) -> tuple[int, int]:
        cpus = self.config.cpus or int((os.cpu_count() or 1) * self.config.cpu_overcommit)
        mem = (self.config.memory_mib or _mem_total() // (1024 * 1024)) * 1024 * 1024
        return cpus, mem

    def register(self) -> None:
        """Upsert this host's row (capacity, driver, capabilities) and heartbeat."""
        cpus, mem = self.capacity()
        now = self.clock.now().timestamp()
        caps = {n: c.as_dict() for n, c in self.capabilities.items()}
        t = models.hosts
        values = {
            "name": self.host_name, "driver": self.driver.name, "cpus": cpus,
            "memory_bytes": mem, "capabilities": caps, "schedulable": True, "heartbeat_at": now,
            "lost_at": None,
        }  # fmt: skip
        with self.engine.begin() as c:
            exists = c.execute(sa.select(t.c.host_id).where(t.c.host_id == self.host_id)).first()
            if exists:
                c.execute(t.update().where(t.c.host_id == self.host_id).values(**values))
            else:
                c.execute(t.insert().values(host_id=self.host_id, registered_at=now, **values))

    def heartbeat(self) -> None:
        """Say this host is alive. A host that was declared lost is schedulable again from
        here; its lost VMs are freed and forgotten by the same reconcile pass. A host an
        operator forgot meanwhile (no row any more) registers again as a new host and frees
        what it still holds of the forgotten VMs."""
        t = models.hosts
        with self.engine.begin() as c:
            res = c.execute(
                t.update()
                .where(t.c.host_id == self.host_id)
                .values(heartbeat_at=self.clock.now().timestamp(), lost_at=None)
            )
        if res.rowcount == 0:
            event(log, "host was forgotten: registering again", logging.WARNING,
                  host_id=self.host_id)  # fmt: skip
            self.register()
            if self.netns_pool is not None:
                self.netns_pool.drop()
            self._free_orphans()

    def status(self) -> dict[str, Any]:
        """The ``capabilities/status`` report (shown by ``unkey dev status``)."""
        cpus, mem = self.capacity()
        counts: dict[str, int] = {}
        for vm in self.list(host_id=self.host_id):
            counts[vm.state] = counts.get(vm.state, 0) + 1
        return {
            "host_id": self.host_id,
            "host_name": self.host_name,
            "driver": self.driver.name,
            "drivers": {n: c.as_dict() for n, c in self.capabilities.items()},
            "kernel": self.kernel.version if self.kernel else None,
            "cpus": cpus,
            "memory_bytes": mem,
            "networking": "tap/netns + nftables" if self.network else "user-mode / host",
            "cgroup_favordynmods": self.cgroups.favordynmods,
            "vms": counts,
        }

    # -- actions ------------------------------------------------------------------------------
    def boot(self, vm_id: str) -> Vm:
        """Boot the VM (a new instance). Returns once the VMM runs (state ``booting``); use
        :meth:`wait_ready` for the app. On another host: recorded for its reconciler."""
        vm = self.get(vm_id)
        if vm.host_id != self.host_id:
            return super().boot(vm_id)
        check_action(vm_id, vm.state, "boot")
        return self._boot_local(vm_id, desired="running")

    def stop(self, vm_id: str) -> Vm:
        vm = self.get(vm_id)
        if vm.host_id != self.host_id:
            return super().stop(vm_id)
        check_action(vm_id, vm.state, "stop")
        self._update(vm_id, desired="stopped")
        return self._stop_local(vm_id)

    def delete(self, vm_id: str) -> None:
        """Delete the VM, stopping it first if needed; nothing of it is left on the host."""
        vm = self.get(vm_id)
        if vm.host_id != self.host_id:
            super().delete(vm_id)
            return
        if vm.state in ACTIVE and vm.state != VmState.STOPPING:
            vm = self._stop_local(vm_id)
        check_action(vm_id, vm.state, "delete")
        self._delete_local(vm_id)

    # -- local work ---------------------------------------------------------------------------
    def _spec(self, r: Any, net: NetAttachment, *, instance_id: str, workdir: Path, rootfs: Path,
              kernel: KernelPaths | None, cgroup: VmCgroup | None,
              launcher: Launcher | None = None) -> VmSpec:  # fmt: skip
        return VmSpec(
            dns=self._dns(net), launcher=launcher,
            vm_id=VmId(r.vm_id), instance_id=InstanceId(instance_id),
            customer_id=CustomerId(r.customer_id), vcpus=r.vcpus, memory_bytes=r.memory_bytes,
            port=r.port, workdir=workdir, rootfs=rootfs, net=net, kernel=kernel, cgroup=cgroup,
            env=dict(r.env or {}),
        )  # fmt: skip

    def _dns(self, net: NetAttachment) -> tuple[str, ...]:
        """Name servers for a guest on ``net``: the host's (let through its NAT) on a VM link;
        QEMU's user-mode network's own resolver; the host's as they are on the host's own
        network (the sandbox without root)."""
        if net.mode in ("netns", "tap"):
            return tuple(self.guest_dns)
        if net.mode == "user":
            return ("10.0.2.3",)
        return tuple(self.host_net_dns)

    def _warm(self, pool_id: str, att: NetAttachment) -> Launcher | None:
        """A pooled spare's VM process, made ahead (sandbox only; see NetnsPool)."""
        if not isinstance(self.driver, SandboxDriver):
            return None
        self.jails.root.mkdir(parents=True, exist_ok=True)
        # beside the jails: a boot renames it into its VM's jail as the console log
        return self.driver.launcher(att, log=self.jails.root / f"{pool_id}.log")

    def _attach(self, vm_id: str) -> tuple[NetAttachment, Launcher | None]:
        """The VM's network link, and its launcher when a pooled spare comes with one."""
        if self.network is None:
            if self.driver.name == "qemu":
                return NetAttachment(mode="user", host_port=free_port()), None
            return NetAttachment(mode="host"), None
        if self.netns_pool is not None and self.driver.name == "sandbox":
            taken = self.netns_pool.take(vm_id)
            if taken is not None:
                return taken
        slot = self.ips.lease(vm_id)
        host_ip, guest_ip = self.ips.addresses(slot)
        if self.driver.name == "sandbox":
            return self.network.attach_netns(vm_id, host_ip, guest_ip), None
        return self.network.attach_tap(vm_id, host_ip, guest_ip), None

    def _boot_local(self, vm_id: str, **values: Any) -> Vm:
        """Prepare and start the VM here (``values``: more columns for its ``preparing`` row).
        The VM is ``booting`` once its process runs (the state and the process's runtime are
        written together: a boot is a handful of database writes, each on the boot path)."""
        instance_id = new_instance_id()
        r = self._transition(vm_id, VmState.PREPARING, instance_id=instance_id, error=None,
                             driver=self.driver.name, **values)  # fmt: skip
        launcher: Launcher | None = None
        rt: VmRuntime | None = None
        try:
            # the cgroup first, then prime(): the kernel's wait for the VM's cgroup join runs
            # while the rest is prepared (see CgroupManager.prime; it blocks cgroup writes)
            overhead = VMM_OVERHEAD_BYTES if self.driver.name == "qemu" else 0
            cg = self.cgroups.create(
                vm_id, vcpus=r.vcpus, memory_limit_bytes=r.memory_bytes + overhead
            )
            self.cgroups.prime()
            net, launcher = self._attach(vm_id)
            self._update(vm_id, net=net.__dict__)
            self._write_record(vm_id, net=net.__dict__)
            copy = self.driver.name != "sandbox"
            jail, disk, jk = self.jails.prepare(
                vm_id, Path(r.rootfs), kernel=self.kernel if copy else None,
                copy_rootfs=copy, with_vmlinux=self.driver.name == "firecracker",
            )  # fmt: skip
            if copy:
                # the guest's init reads its environment from the image (builder contract)
                inject_env(disk, dict(r.env or {}))
                inject_resolv(disk, list(self._dns(net)))
            spec = self._spec(r, net, instance_id=instance_id, workdir=jail, rootfs=disk,
                              kernel=jk, cgroup=cg, launcher=launcher)  # fmt: skip
            self.driver.create(spec)
            rt = self.driver.boot(spec)
            self._write_record(vm_id, net=net.__dict__, runtime=rt.to_json())
            row = self._transition(vm_id, VmState.BOOTING, runtime=rt.to_json())
        except UnkeyError as exc:
            self._abandon(vm_id, launcher, rt)
            self._fail(vm_id, str(exc))
            raise
        except Exception as exc:
            self._abandon(vm_id, launcher, rt)
            self._fail(vm_id, f"{type(exc).__name__}: {exc}")
            raise VmError(f"booting VM {vm_id} failed: {exc}") from exc
        return _to_vm(row)

    def _abandon(self, vm_id: str, launcher: Launcher | None, rt: VmRuntime | None) -> None:
        """A boot that failed: end its launcher (unless it ran) and the VM's process if it
        started. Its runtime may be recorded nowhere (the write that failed was the one to
        record it, e.g. a full disk, the database away, or the VM stopped meanwhile), so the
        release that follows would not find it: it would run on, untracked."""
        if launcher is not None:
            launcher.discard()  # (run or discarded already: nothing)
        if rt is None:
            return
        try:
            self.driver.delete(rt)
        except UnkeyError as exc:
            event(log, "vm not stopped", logging.ERROR, vm_id=vm_id, pid=rt.pid,
                  error=str(exc))  # fmt: skip

    def _release(self, vm_id: str) -> None:
        """Free everything the VM holds on this host (idempotent)."""
        r = self._row(vm_id)
        errors = self._free_local(vm_id, r.runtime, r.net)
        self._update(vm_id, runtime=None)
        if errors:
            raise VmError(f"releasing VM {vm_id} left problems: {'; '.join(errors)}")

    def _free_local(
        self, vm_id: str, runtime: Mapping[str, Any] | None, net: Mapping[str, Any] | None
    ) -> builtins.list[str]:
        """Stop the VM's process and remove its cgroup, links, address lease, jail and local
        record (idempotent); returns the problems left."""
        errors: builtins.list[str] = []
        try:
            if runtime:
                self.driver.delete(VmRuntime.from_json(runtime))
            else:
                self.driver.remove_leftovers(vm_id)
        except UnkeyError as exc:
            errors.append(str(exc))
        cg = self.cgroups.paths_for(vm_id)
        try:
            cg.remove()
        except (OSError, VmError) as exc:
            errors.append(f"cgroup: {exc}")
        if net and self.network is not None:
            try:
                self.network.detach(NetAttachment(**net))
            except VmError as exc:
                errors.append(str(exc))
        self.ips.release(vm_id)
        try:
            self.jails.remove(vm_id)
        except OSError as exc:
            errors.append(f"jail: {exc}")
        if not errors:
            self._record_path(vm_id).unlink(missing_ok=True)
        return errors

    # -- local records: what frees a VM whose row is gone --------------------------------------
    def _record_path(self, vm_id: str) -> Path:
        return self.state_dir / "vms" / f"{vm_id}.json"

    def _write_record(self, vm_id: str, **values: Any) -> None:
        """Keep what :meth:`_free_local` needs (links, runtime) on local disk too: a VM's row
        goes when an operator forgets its lost host, and a host that comes back must still
        find and stop what runs of it here."""
        path = self._record_path(vm_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        tmp.replace(path)

    def _free_orphans(self) -> builtins.list[str]:
        """Free what this host holds of VMs with no row on it any more (forgotten with their
        lost host): found by their local record, jail directory or cgroup. Runs at start and
        when a forgotten host registers again. Returns their ids."""
        local = {p.stem for p in (self.state_dir / "vms").glob("vm_*.json")}
        if self.jails.root.is_dir():
            local |= {p.name for p in self.jails.root.iterdir() if p.name.startswith("vm_")}
        for d in self.cgroups.paths_for("vm_").dirs():
            if d.parent.is_dir():
                local |= {p.name for p in d.parent.iterdir() if p.name.startswith("vm_")}
        if not local:
            return []
        # read after the local names: a VM created meanwhile has its row before its jail
        known = {vm.vm_id for vm in self.list(host_id=self.host_id)}
        freed = []
        for vm_id in sorted(local - known):
            record: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(self._record_path(vm_id).read_text())
            net = record.get("net")
            if net is None and self.network is not None:
                # booted no further than its links: they carry the VM's names
                net = {"mode": "netns", "host_iface": iface_name(vm_id),
                       "netns": netns_name(vm_id)}  # fmt: skip
            errors = self._free_local(vm_id, record.get("runtime"), net)
            event(log, "forgotten vm freed", logging.WARNING, vm_id=vm_id,
                  host_id=self.host_id, problems="; ".join(errors) or None)  # fmt: skip
            freed.append(vm_id)
        return freed

    def _fail(self, vm_id: str, error: str) -> None:
        event(log, "vm failed", logging.WARNING, vm_id=vm_id, error=error)
        with contextlib.suppress(UnkeyError):
            self._release(vm_id)
        with contextlib.suppress(IllegalTransition):
            self._set_state(vm_id, VmState.FAILED, error=error[:2000])

    def _stop_local(self, vm_id: str) -> Vm:
        self._set_state(vm_id, VmState.STOPPING)
        r = self._row(vm_id)
        try:
            if r.runtime:
                self.driver.stop(VmRuntime.from_json(r.runtime), self.config.stop_timeout_s)
            self._release(vm_id)
        except UnkeyError as exc:
            self._fail(vm_id, f"stop: {exc}")
            raise
        return self._set_state(vm_id, VmState.STOPPED)

    def _delete_local(self, vm_id: str) -> None:
        self._release(vm_id)
        # the process is gone, nothing reads the rootfs any more; a failure keeps the row (and
        # the lease), so deleting again retries
        self._release_lease(self._row(vm_id).asset_id, vm_id)
        with self.engine.begin() as c:
            c.execute(models.vms.delete().where(models.vms.c.vm_id == vm_id))
        event(log, "vm deleted", vm_id=vm_id)

    # -- readiness ----------------------------------------------------------------------------
    def _log_tail(self, vm_id: str, n: int = 600) -> str:
        r = self._row(vm_id)
        if not r.runtime:
            return ""
        rt = VmRuntime.from_json(r.runtime)
        tail = ""
        for p in (Path(rt.workdir) / "vmm.log", Path(rt.log_path)):
            with contextlib.suppress(OSError):
                tail += p.read_text(errors="replace")[-n:]
        return f"; log: {tail.strip()}" if tail.strip() else ""

    def _on_dead(self, vm_id: str) -> None:
        self._fail(vm_id, "the VM process exited during boot" + self._log_tail(vm_id))

    def _alive(self, vm_id: str) -> bool:
        r = self._row(vm_id)
        if not r.runtime:
            return False
        return self.driver.inspect(VmRuntime.from_json(r.runtime))

    # -- metering -----------------------------------------------------------------------------
    def meter_target(self, vm_id: str) -> MeterTarget:
        """What the collector reads for this running VM instance."""
        r = self._row(vm_id)
        if r.host_id != self.host_id or not r.runtime or not r.instance_id:
            raise IllegalTransition(f"VM {vm_id} is not running on this host")
        rt = VmRuntime.from_json(r.runtime)
        cg = self.cgroups.paths_for(vm_id)
        net = NetAttachment(**r.net) if r.net else None
        return MeterTarget(
            key=SeriesKey(r.customer_id, r.vm_id, r.instance_id, r.vcpus, r.memory_bytes),
            pid=rt.pid,
            cgroup_v2_dir=cg.v2 if cg.v2 and cg.v2.exists() else None,
            cgroup_v1_cpuacct_dir=cg.cpuacct_dir if cg.cpuacct_dir and cg.cpuacct_dir.exists()
            else None,
            cgroup_v1_memory_dir=cg.memory_dir if cg.memory_dir and cg.memory_dir.exists()
            else None,
            host_iface=net.host_iface if net else None,
            qmp_socket=Path(rt.qmp_socket) if rt.qmp_socket else None,
            firecracker_metrics=Path(rt.metrics_path) if rt.metrics_path else None,
        )  # fmt: skip

    def meter_targets(self) -> builtins.list[MeterTarget]:
        out = []
        for vm in self.list(host_id=self.host_id):
            if vm.state in (VmState.BOOTING, VmState.RUNNING):
                with contextlib.suppress(UnkeyError):
                    out.append(self.meter_target(vm.vm_id))
        return out

    # -- reconciliation -----------------------------------------------------------------------
    def recover(self) -> None:
        """After a (re)start: re-attach to live VMs; mark the rest failed and free them."""
        for vm in self.list(host_id=self.host_id):
            if vm.state in (VmState.BOOTING, VmState.RUNNING):
                r = self._row(vm.vm_id)
                rt = VmRuntime.from_json(r.runtime) if r.runtime else None
                if rt is None or not self.driver.recover(rt):
                    self._fail(vm.vm_id, "the VM process was gone when metald restarted")
            elif vm.state in (VmState.PREPARING, VmState.STOPPING):
                self._fail(vm.vm_id, f"metald stopped while the VM was {vm.state}")
            elif vm.state == VmState.LOST:
                self._forget_lost(vm.vm_id)
        self._free_orphans()
        if isinstance(self.driver, SandboxDriver):
            self.driver.release_unused_images()

    def _forget_lost(self, vm_id: str) -> None:
        """This host was declared lost while it had ``vm_id`` (now replaced elsewhere or
        deleted): stop whatever still runs of it here, free its resources, delete the row."""
        with contextlib.suppress(UnkeyError):
            self._release(vm_id)
        # nothing of the VM runs any more: its asset may go (a failure keeps the row, so the
        # next pass retries)
        self._release_lease(self._row(vm_id).asset_id, vm_id)
        with self.engine.begin() as c:
            c.execute(
                models.vms.delete().where(
                    models.vms.c.vm_id == vm_id, models.vms.c.state == str(VmState.LOST)
                )
            )
        event(log, "lost vm forgotten", logging.WARNING, vm_id=vm_id, host_id=self.host_id)

    def reconcile(self) -> None:
        """One pass: converge this host's VMs to their desired state; detect dead VMs. Returns
        once the boots, stops and deletions it started are done (the background loop does not
        wait for them: :meth:`_pass`)."""
        self._pass()
        self._drain()

    def _drain(self) -> None:
        with self._busy_lock:
            work = list(self._work)
        wait(work)

    def _in_background(self, vm_id: str, work: Callable[[], object]) -> None:
        """Run a VM's boot, stop, deletion or readiness probe off the reconcile pass: a stop
        may wait ``stop_timeout_s`` for the app and a boot copies a rootfs, and a pass (which also
        heartbeats: a host silent for ``lost_after_s`` is declared lost) must not wait for
        those of many VMs one after the other. One at a time per VM; up to VM_WORKERS VMs at
        once."""
        with self._busy_lock:
            if vm_id in self._busy:
                return
            self._busy.add(vm_id)

        def run() -> None:
            try:
                work()
            except UnkeyError as exc:
                event(log, "reconcile", logging.WARNING, vm_id=vm_id, error=str(exc))
            except Exception as exc:
                event(log, "reconcile", logging.ERROR, vm_id=vm_id,
                      error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            finally:
                with self._busy_lock:
                    self._busy.discard(vm_id)

        try:
            fut = self._workers.submit(run)
        except RuntimeError:  # closed: a pass called after close() does its work itself
            run()
            return
        with self._busy_lock:
            self._work.add(fut)
        fut.add_done_callback(self._work_done)

    def _work_done(self, fut: Future[None]) -> None:
        with self._busy_lock:
            self._work.discard(fut)

    def _pass(self) -> None:
        now = self.clock.monotonic()
        if now - self._last_heartbeat >= self.lost_after_s / 10:
            self.heartbeat()
            self._last_heartbeat = now
        if now - self._last_sweep >= self.lost_after_s / 10:
            self._last_sweep = now
            try:
                self.sweep_lost_hosts()
            except UnkeyError as exc:
                event(log, "sweep lost hosts", logging.WARNING, error=str(exc))
        if isinstance(self.driver, SandboxDriver):  # images kept past their last VM
            self.driver.release_unused_images(idle_for=self.config.image_keep_s)
        vms = self.list(host_id=self.host_id)
        for state in VmState:
            metrics.VMS.labels(str(state)).set(sum(1 for vm in vms if vm.state == state))
        if now - self._last_compact >= 1.0:
            self._last_compact = now
            self._compact_consoles(vms)
        for vm in vms:
            with self._busy_lock:
                if vm.vm_id in self._busy:
                    continue  # its boot, stop or deletion is under way
            try:
                self._reconcile_one(vm)
            except UnkeyError as exc:
                event(log, "reconcile", logging.WARNING, vm_id=vm.vm_id, error=str(exc))

    def _compact_consoles(self, vms: builtins.list[Vm]) -> None:
        """Keep each running VM's console log to ``console_keep_bytes`` (console.compact)."""
        for vm in vms:
            if vm.state in (VmState.BOOTING, VmState.RUNNING):
                path = self.jails.path(vm.vm_id) / CONSOLE_LOG
                try:
                    freed = compact(path, self.config.console_keep_bytes)
                except OSError as exc:
                    if vm.vm_id not in self._not_compacted:
                        self._not_compacted.add(vm.vm_id)
                        event(log, "console not compacted", logging.WARNING, vm_id=vm.vm_id,
                              error=str(exc))  # fmt: skip
                    continue
                if freed:
                    event(log, "console compacted", vm_id=vm.vm_id, freed_bytes=freed)

    def _reconcile_one(self, vm: Vm) -> None:
        if vm.state == VmState.LOST:
            self._forget_lost(vm.vm_id)
            return
        if vm.state in (VmState.BOOTING, VmState.RUNNING) and not self._alive(vm.vm_id):
            self._fail(vm.vm_id, "the VM process exited" + self._log_tail(vm.vm_id))
            return
        if vm.desired == "deleted":
            self._in_background(vm.vm_id, lambda: self._converge_deleted(vm.vm_id))
            return
        if vm.desired == "running" and vm.state in (VmState.PENDING, VmState.STOPPED):
            self._in_background(vm.vm_id, lambda: self._boot_local(vm.vm_id))
        elif vm.desired == "stopped" and vm.state in (VmState.BOOTING, VmState.RUNNING):
            self._in_background(vm.vm_id, lambda: self._stop_local(vm.vm_id))
        elif vm.state == VmState.BOOTING:
            self._in_background(vm.vm_id, lambda: self._mark_running(vm))

    def _mark_running(self, vm: Vm) -> None:
        """A booting VM is running once its app answers. Off the pass: behind a tap whose guest
        is not up yet, a probe waits out its connect timeout, and a pass must not wait that
        long for each of many booting VMs."""
        if self.probe(vm, timeout=0.2):
            with contextlib.suppress(IllegalTransition):
                self._set_state(vm.vm_id, VmState.RUNNING)

    def _converge_deleted(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        if vm.state in (VmState.BOOTING, VmState.RUNNING, VmState.PREPARING):
            self._stop_local(vm_id)
        if self.get(vm_id).state in (VmState.PENDING, VmState.STOPPED, VmState.FAILED):
            self._delete_local(vm_id)

    def start(self, interval: float = 0.2) -> None:
        """Run a reconcile pass every ``interval`` seconds in a background thread (boots, stops
        and deletions run beside it: :meth:`_in_background`)."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop_evt.wait(interval):
                try:
                    self._pass()
                except Exception as exc:  # keep the loop alive; the next pass retries
                    event(log, "reconcile loop", logging.ERROR, error=str(exc))

        self._thread = threading.Thread(target=loop, name="metald-reconcile", daemon=True)
        self._thread.start()

    def close(self, *, remove_network: bool = False) -> None:
        """Stop the background loop (VMs keep running; a new Metald recovers them). The host's
        nftables tables stay while a VM of this host may still run (its NAT and isolation);
        with none, they go (the next start installs them again)."""
        self._stop_evt.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._drain()  # stops and deletions under way finish
        self._workers.shutdown(wait=True)
        if self.netns_pool is not None:
            self.netns_pool.close()
        if isinstance(self.driver, SandboxDriver):  # the kept ones no VM stands on
            self.driver.release_unused_images()
        if self.network is not None and (
            remove_network or not any(vm.state in ACTIVE for vm in self.list(host_id=self.host_id))
        ):
            self.network.teardown()

    def shutdown(self) -> None:
        """Delete every VM of this host and remove the host's network rules and cgroups."""
        self.close()
        # all at once: each may wait stop_timeout_s for its app
        vms = self.list(host_id=self.host_id)
        with ThreadPoolExecutor(max_workers=VM_WORKERS, thread_name_prefix="metald-purge") as ex:
            for fut in [ex.submit(self.delete, vm.vm_id) for vm in vms]:
                with contextlib.suppress(UnkeyError):
                    fut.result()
        if self.network is not None:
            self.network.teardown()
        if isinstance(self.driver, SandboxDriver):  # kept by the deletions above
            self.driver.release_unused_images()
        for d in self.cgroups.paths_for("x").dirs():
            with contextlib.suppress(OSError):
                d.parent.rmdir()
        with self.engine.begin() as c:
            c.execute(models.hosts.delete().where(models.hosts.c.host_id == self.host_id))
        shutil.rmtree(self.state_dir / "jails", ignore_errors=True)
        shutil.rmtree(self.state_dir / "vms", ignore_errors=True)
        shutil.rmtree(self.state_dir / "netns-pool", ignore_errors=True)


def http_status(url: str, path: str, *, connect_timeout: float, timeout: float) -> int | None:
    """The status of one ``GET path`` of ``url`` (``http://host:port``), or None when nothing
    answers HTTP there. A bare HTTP/1.0 request on a socket, not an HTTP client: readiness is
    polled every half millisecond while an app starts, and a client's request costs ~0.4 ms of
    CPU (the app needs it then) where this costs ~0.1."""
    hostport = url.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        # a short connect: a guest still booting behind a tap answers nothing (no RST), and
        # the next look comes soon anyway
        with socket.create_connection((host, int(port)), timeout=connect_timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
                      .encode())  # fmt: skip
            head = b""
            while b"\r\n" not in head and len(head) < 256:
                chunk = s.recv(256)
                if not chunk:
                    break
                head += chunk
    except (OSError, ValueError):
        return None
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])


def parse_vm_id(value: str) -> VmId:
    if not is_id(value, "vm"):
        raise InvalidInput(f"{value!r} is not a vm_ id")
    return VmId(value)
