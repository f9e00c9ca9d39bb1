"""The deploy workflow's orchestration: what it records, in what order, and on failure."""

from __future__ import annotations

from typing import Any

import pytest

from unkey_deploy.core.errors import BuildFailed, LayerError
from unkey_deploy.deployer.api import BuiltAsset, DeployRequest, LaunchedVm, Progress
from unkey_deploy.deployer.workflow import run_deploy


class Recorder:
    def __init__(self) -> None:
        self.states: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def set_state(self, deployment_id: str, state: str, /, **fields: Any) -> None:
        self.states.append((state, fields))

    def event(self, deployment_id: str, phase: str, message: str, /, **data: Any) -> None:
        self.events.append((phase, message, data))


class Builds:
    def __init__(self, error: BuildFailed | None = None) -> None:
        self.error = error

    def build(self, req: DeployRequest, progress: Progress, /) -> BuiltAsset:
        progress("build", "pulling layer 1/1", layer=0)
        if self.error:
            raise self.error
        return BuiltAsset(asset_id="ast_1", build_id="bld_1", rootfs_bytes=4096, cached=False)


class Vms:
    def __init__(self) -> None:
        self.launched: list[int] = []

    def launch(
        self, req: DeployRequest, asset: BuiltAsset, replica: int, progress: Progress, /
    ) -> LaunchedVm:
        progress("vm", f"booting replica {replica}")
        self.launched.append(replica)
        return LaunchedVm(f"vm_{replica}", f"inst_{replica}", "host_a", f"http://10.0.0.{replica}")


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
    assert phases == ["build", "build", "asset", "vm", "vm", "vm", "vm", "done"]


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
