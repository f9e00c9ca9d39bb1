"""The VM lifecycle as an explicit state machine (persisted in ``metald_vms.state``).

    pending ──boot──▶ preparing ──▶ booting ──▶ running ──stop──▶ stopping ──▶ stopped
       │                  │            │           │                  │            │
       └──────────────────┴────────────┴───────────┴──── failed ◀─────┘            │
    stopped / failed ──boot──▶ preparing (a new instance)
    any state ──(its host's heartbeat stopped)──▶ lost (final: replaced elsewhere, or deleted)
    delete: pending, stopped, failed, lost

A VM whose process dies while ``booting``/``running`` is marked ``failed`` by the reconciler and
its resources are freed. A VM whose *host* stops heartbeating is ``lost``: nobody can tell
whether it still runs, so it is never booted again; the scheduler places a replacement VM (a
new VM and instance, so a new metering series) when the owner wanted it running, and the lost
host, should it come back, frees whatever the lost VM still holds there and forgets it.
Every illegal action raises :class:`IllegalTransition` naming the VM, its state and the action.
"""

from __future__ import annotations

from enum import StrEnum

from ..core.errors import IllegalTransition


class VmState(StrEnum):
    PENDING = "pending"
    PREPARING = "preparing"
    BOOTING = "booting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    LOST = "lost"


S = VmState
TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    S.PENDING: frozenset({S.PREPARING, S.FAILED, S.LOST}),
    S.PREPARING: frozenset({S.BOOTING, S.FAILED, S.STOPPING, S.LOST}),
    S.BOOTING: frozenset({S.RUNNING, S.FAILED, S.STOPPING, S.LOST}),
    S.RUNNING: frozenset({S.STOPPING, S.FAILED, S.LOST}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED, S.LOST}),
    S.STOPPED: frozenset({S.PREPARING, S.LOST}),
    S.FAILED: frozenset({S.PREPARING, S.LOST}),
    S.LOST: frozenset(),
}

# Actions a caller may ask for, and the states in which each is legal.
ACTIONS: dict[str, frozenset[VmState]] = {
    "boot": frozenset({S.PENDING, S.STOPPED, S.FAILED}),
    "stop": frozenset({S.PREPARING, S.BOOTING, S.RUNNING}),
    "delete": frozenset({S.PENDING, S.STOPPED, S.FAILED, S.LOST}),
}

# States in which the VM holds host resources (process, jail, network, cgroup).
ACTIVE: frozenset[VmState] = frozenset({S.PREPARING, S.BOOTING, S.RUNNING, S.STOPPING})


_SOURCES: dict[VmState, tuple[str, ...]] = {
    target: tuple(sorted(str(s) for s, nexts in TRANSITIONS.items() if target in nexts))
    for target in VmState
}


def sources(target: VmState) -> tuple[str, ...]:
    """The states from which ``target`` may be reached."""
    return _SOURCES[target]


def transition(vm_id: str, current: VmState, target: VmState) -> VmState:
    """Return ``target`` if ``current -> target`` is legal, else raise IllegalTransition."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(
            f"VM {vm_id} cannot go from {current} to {target}",
            details={"vm_id": vm_id, "from": str(current), "to": str(target)},
        )
    return target


def check_action(vm_id: str, current: VmState, action: str) -> None:
    """Raise IllegalTransition unless ``action`` (boot, stop, delete) is legal in ``current``."""
    legal = ACTIONS[action]
    if current not in legal:
        raise IllegalTransition(
            f"cannot {action} VM {vm_id}: it is {current}"
            f" ({action} is allowed when {', '.join(sorted(legal))})",
            details={"vm_id": vm_id, "state": str(current), "action": action},
        )
