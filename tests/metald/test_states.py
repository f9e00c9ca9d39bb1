"""The VM lifecycle state machine."""

from __future__ import annotations

import itertools

import pytest

from unkey_deploy.core.errors import IllegalTransition
from unkey_deploy.metald.states import TRANSITIONS, VmState, check_action, transition

S = VmState


def test_happy_path_and_reboot() -> None:
    path = [S.PENDING, S.PREPARING, S.BOOTING, S.RUNNING, S.STOPPING, S.STOPPED, S.PREPARING]
    for a, b in itertools.pairwise(path):
        assert transition("vm_x", a, b) == b


@pytest.mark.parametrize(
    ("src", "dst"),
    [(S.PENDING, S.RUNNING), (S.STOPPED, S.RUNNING), (S.RUNNING, S.BOOTING),
     (S.STOPPED, S.STOPPING), (S.FAILED, S.RUNNING), (S.RUNNING, S.PENDING),
     (S.LOST, S.PREPARING), (S.LOST, S.RUNNING), (S.LOST, S.FAILED)],
)  # fmt: skip
def test_illegal_transitions_raise(src: VmState, dst: VmState) -> None:
    with pytest.raises(IllegalTransition) as ei:
        transition("vm_x", src, dst)
    assert ei.value.details == {"vm_id": "vm_x", "from": str(src), "to": str(dst)}
    assert ei.value.code == "illegal_transition"


def test_every_active_state_can_fail() -> None:
    for s in (S.PENDING, S.PREPARING, S.BOOTING, S.RUNNING, S.STOPPING):
        assert S.FAILED in TRANSITIONS[s]
    assert set(TRANSITIONS) == set(VmState)


def test_any_state_but_lost_can_be_lost_and_lost_is_final() -> None:
    for s in VmState:
        assert (S.LOST in TRANSITIONS[s]) == (s != S.LOST)
    assert TRANSITIONS[S.LOST] == frozenset()
    check_action("vm_x", S.LOST, "delete")
    for action in ("boot", "stop"):
        with pytest.raises(IllegalTransition, match=f"cannot {action} VM vm_x: it is lost"):
            check_action("vm_x", S.LOST, action)


def test_actions() -> None:
    check_action("vm_x", S.PENDING, "boot")
    check_action("vm_x", S.RUNNING, "stop")
    check_action("vm_x", S.FAILED, "delete")
    with pytest.raises(IllegalTransition, match="cannot boot VM vm_x: it is running"):
        check_action("vm_x", S.RUNNING, "boot")
    with pytest.raises(IllegalTransition, match="cannot delete"):
        check_action("vm_x", S.RUNNING, "delete")
    with pytest.raises(IllegalTransition, match="cannot stop"):
        check_action("vm_x", S.STOPPED, "stop")


def test_driver_probe_report(tmp_path, kernel) -> None:  # type: ignore[no-untyped-def]
    """What `unkey dev status` shows: every driver's trial, and auto picks the first that works
    (firecracker cannot run here; qemu can, under TCG since KVM cannot boot guests here)."""
    from unkey_deploy.metald.select import probe_drivers, select_driver

    report = probe_drivers(kernel, tmp_path)
    assert set(report) == {"firecracker", "qemu", "sandbox"}
    assert not report["firecracker"].available
    assert report["qemu"].available and report["qemu"].accel in ("tcg", "kvm")
    assert report["sandbox"].available and report["sandbox"].isolation == "namespaces"
    drv, tried = select_driver("auto", kernel, tmp_path)
    assert drv.name == "qemu" and list(tried) == ["firecracker", "qemu"]
    assert select_driver("sandbox", kernel, tmp_path)[0].name == "sandbox"
    from unkey_deploy.core.errors import Unavailable

    with pytest.raises(Unavailable, match="firecracker: firecracker/jailer binaries not found"):
        select_driver("firecracker", kernel, tmp_path)
