"""The deploy workflow's orchestration: what it records, in what order, on failure, and when
the user's stop interrupts it (then it records nothing and its wind-down deletes what it made)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from unkey_deploy.core.errors import (
    BuildFailed,
    DeadlineExceeded,
    IllegalTransition,
    LayerError,
    VmError,
)
from unkey_deploy.deployer.api import (
    BuiltAsset,
    DeployRequest,
    Interrupted,
    Interruption,
    LaunchedVm,
    Progress,
)
from unkey_deploy.deployer.workflow import run_deploy, run_stop, wind_down


class Recorder:
    """The control plane's record; ``refuse`` names states the lifecycle refuses (someone else
    moved the deployment), ``on_event`` sees each event as it is recorded."""

    def __init__(
        self,
        refuse: frozenset[str] = frozenset(),
        on_event: Callable[[str, dict[str, Any]], None] = lambda _p, _d: None,
    ) -> None:
        self.states: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.refuse = refuse
        self.on_event = on_event

    def set_state(self, deployment_id: str, state: str, /, **fields: Any) -> None:
        if state in self.refuse:
            raise IllegalTransition(
                f"deployment {deployment_id} cannot go from stopping to {state}"
            )
        self.states.append((state, fields))

    def event(self, deployment_id: str, phase: str, message: str, /, **data: Any) -> None:
        self.events.append((phase, message, data))
        self.on_event(phase, data)


class Builds:
    def __init__(self, error: BuildFailed | None = None) -> None:
        self.error = error

        self.cancelled: list[tuple[str, str]] = []

    def build(self, req: DeployRequest, progress: Progress, /) -> BuiltAsset:
        progress("build", "build bld_1 queued", build_id="bld_1")
        progress("build", "pulling layer 1/1", layer=0, build_id="bld_1")
        if self.error:
            raise self.error
        return BuiltAsset(asset_id="ast_1", build_id="bld_1", rootfs_bytes=4096, cached=False)

    def cancel(self, build_id: str, deployment_id: str, /) -> bool:
        self.cancelled.append((build_id, deployment_id))
        return True


class Vms:
    """VMs as metald keeps them: ``launch`` creates one (then fails with ``error`` if set),
    ``stop_all`` deletes every one left (or raises ``stop_error``)."""

    def __init__(
        self, error: VmError | None = None, stop_error: DeadlineExceeded | None = None
    ) -> None:
        self.launched: list[int] = []
        self.live: list[str] = []
        self.error = error
        self.stop_error = stop_error

    def launch(
        self, req: DeployRequest, asset: BuiltAsset, replica: int, progress: Progress, /
    ) -> LaunchedVm:
        self.live.append(f"vm_{replica}")
        progress("vm", f"booting replica {replica}")
        self.launched.append(replica)
        if self.error:
            raise self.error
        return LaunchedVm(f"vm_{replica}", f"inst_{replica}", "host_a", f"http://10.0.0.{replica}")

    def abort(self, deployment_id: str, /) -> list[str]:
        return list(self.live)

    def stop_all(self, deployment_id: str, progress: Progress, /) -> list[str]:
        if self.stop_error:
            raise self.stop_error
        gone, self.live = self.live, []
        for vm in gone:
            progress("vm", f"{vm} stopped and deleted", vm_id=vm)
        return gone


def request(replicas: int = 1) -> DeployRequest:
    return DeployRequest(
        deployment_id="dep_1", customer_id="cust_1", tenant_id="ten_1", request_id="req_1",
        name="web", image="127.0.0.1:5000/web:1", vcpus=1, memory_bytes=256 << 20, port=8080,
        replicas=replicas,
    )  # fmt: skip


def test_success_runs_build_then_every_replica_and_ends_running_with_url() -> None:
    rec, vms = Recorder(), Vms()
    launched = run_deploy(request(replicas=2), Builds(), vms, rec)
    assert [v.vm_id for v in launched] == ["vm_0", "vm_1"] and vms.launched == [0, 1]
    assert [s for s, _ in rec.states] == ["building", "deploying", "running"]
    assert rec.states[1][1] == {"asset_id": "ast_1"}
    assert rec.states[-1][1] == {"url": "http://10.0.0.0"}
    phases = [p for p, _, _ in rec.events]
    assert phases == ["build", "build", "build", "asset", "vm", "vm", "vm", "vm", "done"]


def test_build_failure_marks_failed_with_the_error_and_boots_nothing() -> None:
    rec, vms = Recorder(), Vms()
    err = LayerError('layer sha256:ab: entry "../x": path escapes the root')
    with pytest.raises(LayerError):
        run_deploy(request(), Builds(error=err), vms, rec)
    assert vms.launched == []
    state, fields = rec.states[-1]
    assert state == "failed" and fields["error"]["code"] == "layer_error"
    assert rec.events[-1][0] == "failed" and "escapes the root" in rec.events[-1][1]


def test_resume_after_crash_in_deploying_does_not_move_back_to_building() -> None:
    rec = Recorder()
    run_deploy(request(), Builds(), Vms(), rec, current_state="deploying")
    assert [s for s, _ in rec.states] == ["deploying", "running"]


def test_a_stop_during_the_build_interrupts_at_the_next_event_and_cancels_that_build() -> None:
    stop = Interruption()
    rec = Recorder(on_event=lambda phase, data: stop.set() if data.get("build_id") else None)
    builds, vms = Builds(), Vms()
    with pytest.raises(Interrupted) as why:
        run_deploy(request(), builds, vms, rec, interruption=stop)
    assert stop.build_id == "bld_1" and vms.launched == []
    assert [s for s, _ in rec.states] == ["building"]  # nothing recorded after the stop
    assert "failed" not in [p for p, _, _ in rec.events]
    assert wind_down("dep_1", builds, vms, rec, interruption=stop, why=why.value) == []
    assert builds.cancelled == [("bld_1", "dep_1")]
    assert ("build", "build bld_1 cancelled", {"build_id": "bld_1"}) in rec.events
    assert rec.events[-2][:2] == ("stop", "deploy interrupted: the deployment was stopped")


def test_a_launch_failing_because_the_deployment_is_torn_down_is_a_stop_not_a_failure() -> None:
    """The watcher deleted the VM the launch waited for: the launch's error is not recorded."""
    asked: list[bool] = []

    def requested() -> bool:  # the job row, read when the launch failed
        asked.append(True)
        return True

    stop = Interruption(requested)
    rec, vms = Recorder(), Vms(error=VmError("VM vm_0 not found"))
    with pytest.raises(Interrupted, match="was stopped"):
        run_deploy(request(replicas=2), Builds(), vms, rec, interruption=stop)
    assert asked == [True] and stop.is_set()
    assert [s for s, _ in rec.states] == ["building", "deploying"]
    assert vms.launched == [0]  # the second replica is never launched
    assert wind_down("dep_1", Builds(), vms, rec, interruption=stop,
                     why=Interrupted("stopped")) == ["vm_0"]  # fmt: skip
    assert vms.live == []


def test_a_move_refused_by_the_lifecycle_is_an_interruption() -> None:
    """The user's stop moved the deployment to stopping between two checks: the deploy's own
    ``running`` is refused, so it stops there and its VMs go in the wind-down."""
    rec, vms = Recorder(refuse=frozenset({"running"})), Vms()
    with pytest.raises(Interrupted, match="cannot go from stopping to running"):
        run_deploy(request(), Builds(), vms, rec)
    assert [s for s, _ in rec.states] == ["building", "deploying"]
    assert "done" not in [p for p, _, _ in rec.events]


def test_the_wind_down_leaves_what_it_cannot_delete_to_the_stop_job() -> None:
    rec = Recorder()
    vms = Vms(stop_error=DeadlineExceeded("VMs of deployment dep_1 still not deleted"))
    assert wind_down("dep_1", Builds(), vms, rec, interruption=Interruption(),
                     why=Interrupted("stopped")) == []  # fmt: skip
    assert rec.states == []
    assert rec.events[-1][0] == "stop" and "the stop job deletes them" in rec.events[-1][1]


def test_a_failed_stop_records_nothing_failed_itself() -> None:
    """Whether a failed stop makes the deployment failed is the worker's decision (it depends on
    the job's retries), so run_stop only raises."""
    rec = Recorder()
    with pytest.raises(DeadlineExceeded):
        run_stop("dep_1", Vms(stop_error=DeadlineExceeded("still there")), rec)
    assert rec.states == [] and rec.events == []
    run_stop("dep_1", Vms(), rec, current_state="failed")
    assert [s for s, _ in rec.states] == ["stopping", "stopped"]


def test_a_failure_racing_the_users_stop_is_never_recorded_over_it() -> None:
    """The launch failed and the job showed no cancel yet, but the stop committed before the
    failure could be written: the deploy's ``failed`` (only from building/deploying) is refused,
    and that is an interruption, not a failure."""
    rec = Recorder(refuse=frozenset({"failed"}))
    with pytest.raises(Interrupted, match="moved under the deploy"):
        run_deploy(request(), Builds(), Vms(error=VmError("health check timed out")), rec)
    assert [s for s, _ in rec.states] == ["building", "deploying"]
    assert "failed" not in [p for p, _, _ in rec.events]


class FailingReplica(Vms):
    """``launch`` of replica ``fail_at`` fails, and (as ``launch_replica`` does) deletes the VM
    it created before raising; the replicas launched before it keep running."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def launch(
        self, req: DeployRequest, asset: BuiltAsset, replica: int, progress: Progress, /
    ) -> LaunchedVm:
        if replica == self.fail_at:
            self.launched.append(replica)
            raise DeadlineExceeded(f"replica {replica}: health check timed out")
        return super().launch(req, asset, replica, progress)


def test_a_failed_replica_leaves_no_vm_of_the_attempt_running() -> None:
    """Replica 1 of 2 never answers: replica 0, already running, is deleted before the
    deployment is recorded failed (a failed deployment runs, and is billed for, nothing)."""
    rec, vms = Recorder(), FailingReplica(fail_at=1)
    with pytest.raises(DeadlineExceeded):
        run_deploy(request(replicas=2), Builds(), vms, rec)
    assert vms.launched == [0, 1]
    assert vms.live == []
    assert [s for s, _ in rec.states] == ["building", "deploying", "failed"]
    assert ("vm", "vm_0 stopped and deleted", {"vm_id": "vm_0"}) in rec.events
    assert rec.events[-1][0] == "failed" and "health check timed out" in rec.events[-1][1]


@pytest.mark.parametrize("left_by", ["deploying", "failed"])
def test_a_retried_deploy_starts_from_no_vms(left_by: str) -> None:
    """A retried deploy job (its worker crashed while ``deploying``, or its attempt failed)
    deletes what an earlier attempt left before launching: the deployment ends with exactly
    ``replicas`` VMs, never the earlier attempt's on top."""
    rec, vms = Recorder(), Vms()
    vms.live = ["vm_left_by_an_earlier_attempt"]
    launched = run_deploy(request(replicas=2), Builds(), vms, rec, current_state=left_by)
    assert [v.vm_id for v in launched] == ["vm_0", "vm_1"]
    assert vms.live == ["vm_0", "vm_1"]
    assert ("vm", "vm_left_by_an_earlier_attempt stopped and deleted",
            {"vm_id": "vm_left_by_an_earlier_attempt"}) in rec.events  # fmt: skip
    assert rec.states[-1][0] == "running"


def test_a_vm_its_failed_launch_left_is_gone_before_the_deployment_is_failed() -> None:
    """The first replica's launch fails and its VM is still there (launch_replica's own delete
    only asks for it, and a failure of that delete is swallowed): the attempt deletes it and
    waits, so a failed deployment holds no VM and no capacity."""
    rec, vms = Recorder(), Vms(error=VmError("VM vm_0 failed: boot timed out"))
    with pytest.raises(VmError):
        run_deploy(request(), Builds(), vms, rec)
    assert vms.launched == [0] and vms.live == []
    assert [s for s, _ in rec.states] == ["building", "deploying", "failed"]
