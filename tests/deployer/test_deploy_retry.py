"""A deploy attempt that fails and will be retried (a retryable error, attempts left) is not a
failed deployment: the real worker on a real database records why and when it retries, and
the deployment moves on; ``failed`` comes only with the last attempt (or an error no retry
can fix). Otherwise ``deploy --wait`` (whose stream ends at ``failed``) reported a failure for
a deployment that then ran."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from unkey_deploy import appspec
from unkey_deploy.core.clock import FakeClock
from unkey_deploy.core.errors import BuildFailed, Unavailable, UnkeyError
from unkey_deploy.core.ids import CustomerId, TenantId
from unkey_deploy.deployer.api import BuiltAsset, DeployRequest, LaunchedVm, Progress
from unkey_deploy.deployer.worker import DeployWorker
from unkey_deploy.gateway.app import accept_deployment, stop_deployment
from unkey_deploy.gateway.auth import Principal
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db, jobs


class FlakyBuilds:
    """Fails with ``errors`` in turn, then builds."""

    def __init__(self, *errors: UnkeyError) -> None:
        self.errors = list(errors)
        self.calls = 0

    def build(self, req: DeployRequest, progress: Progress, /) -> BuiltAsset:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return BuiltAsset(asset_id="ast_1", build_id="bld_1", rootfs_bytes=4096, cached=False)

    def cancel(self, build_id: str, deployment_id: str, /) -> bool:
        return False


class OneHostVms:
    def __init__(self) -> None:
        self.live: list[str] = []

    def launch(
        self, req: DeployRequest, asset: BuiltAsset, replica: int, progress: Progress, /
    ) -> LaunchedVm:
        vm = f"vm_{len(self.live)}"
        self.live.append(vm)
        return LaunchedVm(vm, "inst", "host_a", "http://10.0.0.2:8080")

    def abort(self, deployment_id: str, /) -> list[str]:
        return []

    def stop_all(self, deployment_id: str, progress: Progress, /) -> list[str]:
        gone, self.live = self.live, []
        return gone


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    db.upgrade(engine)
    yield db.session_factory(engine)
    engine.dispose()


def _accepted(factory: sessionmaker[Session], clock: FakeClock) -> str:
    with db.transaction(factory) as s:
        c = cp.create_customer(s, f"retry-co-{uuid.uuid4().hex[:8]}", now=1.0)
    who = Principal(CustomerId(c.id), TenantId(c.tenant_id), "key_x", "api_key")
    spec = appspec.validate_data(
        {"name": "web", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "128MiB"}}
    )
    _status, body, _ = accept_deployment(factory, clock, who, spec, request_id="req_1",
                                         idempotency_key=None)  # fmt: skip
    dep_id: str = body["deployment"]["id"]
    return dep_id


def _events(factory: sessionmaker[Session], dep_id: str) -> list[cp.DeploymentEvent]:
    with factory() as s:
        return cp.events_after(s, dep_id)


def test_a_retried_attempt_leaves_the_deployment_on_its_way_not_failed(
    factory: sessionmaker[Session],
) -> None:
    clock = FakeClock()
    dep_id = _accepted(factory, clock)
    builds = FlakyBuilds(Unavailable("registry 127.0.0.1:5000 unreachable"))
    worker = DeployWorker(factory, builds, OneHostVms(), worker_id="w1", clock=clock)
    records = cp.DeploymentRecords(factory, clock)

    assert worker.run_once()
    dep = records.get(dep_id)
    assert dep.state == "building", dep  # not failed: the job is queued again
    retry = _events(factory, dep_id)[-1]
    assert retry.phase == "retry"
    assert "attempt 1/3 failed: registry 127.0.0.1:5000 unreachable" in retry.message
    assert "retrying in 1 s" in retry.message
    assert "failed" not in [e.phase for e in _events(factory, dep_id)]

    clock.advance(1.5)
    assert worker.run_once()
    dep = records.get(dep_id)
    assert dep.state == "running" and dep.error is None
    assert builds.calls == 2


def test_the_last_attempt_or_an_error_no_retry_fixes_fails_it(
    factory: sessionmaker[Session],
) -> None:
    clock = FakeClock()
    flaky = _accepted(factory, clock)
    down = Unavailable("registry unreachable")
    worker = DeployWorker(factory, FlakyBuilds(down, down, down), OneHostVms(), worker_id="w1",
                          clock=clock)  # fmt: skip
    records = cp.DeploymentRecords(factory, clock)
    for attempt in (1, 2, 3):
        assert worker.run_once()
        clock.advance(10)
        assert records.get(flaky).state == ("failed" if attempt == 3 else "building")
    assert records.get(flaky).error is not None
    assert records.get(flaky).error["code"] == "unavailable"  # type: ignore[index]
    with factory() as s:
        assert jobs.get(s, records.get(flaky).job_id or "").state == jobs.JobState.FAILED

    broken = _accepted(factory, clock)
    worker.builds = FlakyBuilds(BuildFailed("nothing to run"))
    assert worker.run_once()
    assert records.get(broken).state == "failed"
    assert _events(factory, broken)[-1].phase == "failed"


def test_a_stop_while_a_retry_waits_cancels_it_and_stops(factory: sessionmaker[Session]) -> None:
    """Between a failed attempt and its retry (the job queued, the deployment ``building``), the
    user's stop cancels the queued retry and the stop job ends it ``stopped``; the retry never
    builds."""
    clock = FakeClock()
    dep_id = _accepted(factory, clock)
    builds = FlakyBuilds(Unavailable("registry unreachable"))
    worker = DeployWorker(factory, builds, OneHostVms(), worker_id="w1", clock=clock)
    assert worker.run_once()
    records = cp.DeploymentRecords(factory, clock)
    dep = records.get(dep_id)
    assert dep.state == "building"
    who = Principal(CustomerId(dep.customer_id), TenantId(dep.tenant_id), "key_x", "api_key")
    status, body = stop_deployment(factory, clock, who, dep_id, request_id="req_2")
    assert status == 202 and body["deployment"]["state"] == "stopping"
    clock.advance(10)
    while worker.run_once():
        pass
    assert records.get(dep_id).state == "stopped"
    assert builds.calls == 1
    with factory() as s:
        assert jobs.get(s, dep.job_id or "").state == jobs.JobState.CANCELLED


def test_a_recorded_spec_that_no_longer_validates_fails_the_deployment_at_once(
    factory: sessionmaker[Session],
) -> None:
    """A deployment accepted under older, looser rules (here a NUL in ``command``, refused since)
    cannot be turned into a deploy request: it fails at once, naming the problem, instead of the
    worker dying on a raw ValidationError and the job waiting out its lease three times."""
    clock = FakeClock()
    dep_id = _accepted(factory, clock)
    with db.transaction(factory) as s:
        row = s.get(cp.DeploymentRow, dep_id)
        assert row is not None
        row.spec = row.spec.replace('"image"', '"command": ["/app\\u0000"], "image"')
    builds = FlakyBuilds()
    worker = DeployWorker(factory, builds, OneHostVms(), worker_id="w1", clock=clock)
    assert worker.run_once()
    dep = cp.DeploymentRecords(factory, clock).get(dep_id)
    assert dep.state == "failed" and dep.error is not None
    assert "command[0]: contains a NUL byte" in dep.error["message"]
    assert builds.calls == 0
    with factory() as s:
        assert jobs.get(s, dep.job_id or "").state == jobs.JobState.FAILED
