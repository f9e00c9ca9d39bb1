"""``DELETE /v1/deployments/{id}`` on a real gatewayd, with the real deployer worker on its
database: what each state answers, idempotency, tenant scope, and how the worker treats the
jobs a stop leaves (a cancelled deploy, an interrupted one, a stop job). VMs are not needed
here: a deployment with none stops at once (tests/deployer/test_stop_vm.py stops real ones,
running and while deploying)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.builder.api import BuildState
from unkey_deploy.builder.service import BuildService, OciImageSource
from unkey_deploy.core.errors import IllegalTransition, NotFound
from unkey_deploy.core.ids import BuildId
from unkey_deploy.deployer.api import BuiltAsset, DeployRequest, Progress
from unkey_deploy.deployer.metald_vms import MetaldVms
from unkey_deploy.deployer.service import BuilderBuilds
from unkey_deploy.deployer.worker import DeployWorker
from unkey_deploy.gateway.tls import client_context
from unkey_deploy.metald.api import Scheduler
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db, jobs
from unkey_deploy.testing.gateway import RunningGateway, new_customer, run_unkey, running_gateway
from unkey_deploy.testing.gateway import TestCustomer as Customer

APP = {"name": "stop-me", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "128MiB"}}


class NoBuilds:
    """These tests never reach a build: a deploy job that did would be a bug."""

    def build(self, req: DeployRequest, progress: Progress, /) -> BuiltAsset:
        raise AssertionError(f"deployment {req.deployment_id} was built after it was stopped")

    def cancel(self, build_id: str, deployment_id: str, /) -> bool:
        raise AssertionError(f"build {build_id} of {deployment_id}: there are no builds here")


@dataclass
class World:
    gw: RunningGateway
    factory: sessionmaker[Session]
    records: cp.DeploymentRecords
    worker: DeployWorker


@pytest.fixture(scope="module")
def world(gateway: RunningGateway) -> Iterator[World]:
    engine = db.make_engine(gateway.database_url)  # gatewayd migrated every service's branch
    factory = db.session_factory(engine)
    scheduler = Scheduler(engine)
    vms = MetaldVms(scheduler, lambda a: (_ for _ in ()).throw(AssertionError(a)))
    worker = DeployWorker(factory, NoBuilds(), vms, worker_id="test-stop-worker")
    try:
        yield World(gateway, factory, cp.DeploymentRecords(factory), worker)
    finally:
        scheduler.close()
        engine.dispose()


def _http(w: World) -> httpx.Client:
    return httpx.Client(base_url=w.gw.url, verify=client_context(w.gw.ca_cert), timeout=30)


def _deploy(w: World, c: Customer) -> dict[str, Any]:
    with w.gw.client(c.key) as client:
        dep: dict[str, Any] = client.deploy(APP)["deployment"]
    return dep


def _stop(w: World, c: Customer, dep_id: str) -> httpx.Response:
    with _http(w) as h:
        return h.delete(f"/v1/deployments/{dep_id}", headers={"Authorization": f"Bearer {c.key}"})


def _jobs(w: World, kind: str, dep_id: str) -> list[jobs.Job]:
    with w.factory() as s:
        return [j for j in jobs.list_jobs(s, kind) if j.payload["deployment_id"] == dep_id]


def _events(w: World, dep_id: str) -> list[cp.DeploymentEvent]:
    with w.factory() as s:
        return cp.events_after(s, dep_id)


def _run_until_idle(w: World) -> None:
    for _ in range(50):
        if not w.worker.run_once():
            return
    raise AssertionError("the worker never ran out of jobs")


def test_accepted_is_cancelled_at_once_and_its_deploy_job_never_runs(world: World) -> None:
    c = new_customer(world.gw)
    dep = _deploy(world, c)
    r = _stop(world, c, dep["id"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["deployment"]["state"] == "cancelled" and body["request_id"]
    (deploy_job,) = _jobs(world, "deploy", dep["id"])
    assert deploy_job.state == jobs.JobState.CANCELLED
    assert _jobs(world, "stop", dep["id"]) == []
    events = _events(world, dep["id"])
    assert [e.phase for e in events] == ["accepted", "stop", "state"]
    assert events[-1].data == {"state": "cancelled"}
    assert events[1].data["request_id"] == body["request_id"]
    # again: the same answer, nothing new
    again = _stop(world, c, dep["id"])
    assert again.status_code == 200 and again.json()["deployment"]["state"] == "cancelled"
    assert len(_events(world, dep["id"])) == len(events)
    _run_until_idle(world)
    assert world.records.get(dep["id"]).state == "cancelled"


def test_a_claimed_deploy_job_of_a_cancelled_deployment_completes_without_building(
    world: World,
) -> None:
    """The user's DELETE lands between the worker's claim and its first move."""
    c = new_customer(world.gw)
    dep = _deploy(world, c)

    class StoppedUnderUs(cp.DeploymentRecords):
        def get(self, deployment_id: str) -> cp.Deployment:
            seen = super().get(deployment_id)  # still accepted
            if seen.state == "accepted":
                assert _stop(world, c, deployment_id).status_code == 200
            return seen

    racing = DeployWorker(world.factory, NoBuilds(), world.worker.vms, worker_id="w-race")
    racing.records = StoppedUnderUs(world.factory)
    assert racing.run_once()
    (job,) = _jobs(world, "deploy", dep["id"])
    # nobody asked the job to cancel (the deployment was): it completes, having done nothing
    assert job.state == jobs.JobState.SUCCEEDED and job.result == {"state": "cancelled"}
    assert world.records.get(dep["id"]).state == "cancelled"
    assert "failed" not in [e.phase for e in _events(world, dep["id"])]


def test_building_with_a_queued_deploy_job_is_stopped_and_the_job_never_runs(
    world: World,
) -> None:
    """A deploy job re-queued (its worker crashed) while building: the stop cancels it at once
    and the stop job stops the deployment; the CLI answers like any stop."""
    c = new_customer(world.gw)
    dep = _deploy(world, c)
    world.records.set_state(dep["id"], "building")  # as a worker does; its job is queued again
    r = _stop(world, c, dep["id"])
    assert r.status_code == 202, r.text
    assert r.json()["deployment"]["state"] == "stopping"
    (deploy_job,) = _jobs(world, "deploy", dep["id"])
    assert deploy_job.state == jobs.JobState.CANCELLED
    (stop_job,) = _jobs(world, "stop", dep["id"])
    assert stop_job.state == jobs.JobState.QUEUED
    out = run_unkey(world.gw, "deployments", "stop", dep["id"], api_key=c.key)
    assert out.code == 0 and out.out.strip() == "stopping", out
    assert len(_jobs(world, "stop", dep["id"])) == 1
    _run_until_idle(world)
    assert world.records.get(dep["id"]).state == "stopped"
    states = [e.data.get("state") for e in _events(world, dep["id"]) if e.phase == "state"]
    assert states == ["building", "stopping", "stopped"]


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.02)
    return got


def test_a_deploy_waiting_for_its_build_is_interrupted_and_the_build_cancelled(
    world: World, tmp_path: Path
) -> None:
    """The deploy job is running (its worker waits for builderd, whose queue holds the build:
    no builder worker here), the user stops: 202 ``stopping``; the worker notices the cancel
    request, cancels the build (still queued: cancelled at once) and acknowledges; the stop job
    then records ``stopped``. Nothing is recorded failed; repeats are harmless; another tenant
    still gets 404."""
    assets = AssetManager(world.factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
    # no builder worker runs here: the init binary is never read
    builder = BuildService(world.factory, assets, OciImageSource(), work_dir=tmp_path / "work",
                           init_binary=tmp_path / "no-init")  # fmt: skip
    worker = DeployWorker(world.factory, BuilderBuilds(builder), world.worker.vms,
                          worker_id="w-interrupt", cancel_poll_s=0.05)  # fmt: skip
    owner, other = new_customer(world.gw), new_customer(world.gw)
    dep_id = _deploy(world, owner)["id"]
    deploying = threading.Thread(target=worker.run_once, name="deploy-job")
    deploying.start()
    try:
        build_id = _wait_for("build", lambda: next(
            (e.data["build_id"] for e in _events(world, dep_id) if "build_id" in e.data), None
        ))  # fmt: skip
        assert world.records.get(dep_id).state == "building"
        assert builder.get(BuildId(build_id)).state == BuildState.QUEUED
        assert _stop(world, other, dep_id).status_code == 404
        r = _stop(world, owner, dep_id)
        assert r.status_code == 202, r.text
        assert r.json()["deployment"]["state"] == "stopping"
        (deploy_job,) = _jobs(world, "deploy", dep_id)
        assert deploy_job.state == jobs.JobState.RUNNING and deploy_job.cancel_requested
        again = _stop(world, owner, dep_id)
        assert again.status_code == 202 and again.json()["deployment"]["state"] == "stopping"
    finally:
        deploying.join(30)
    assert not deploying.is_alive(), "the deploy worker did not notice the stop"
    (deploy_job,) = _jobs(world, "deploy", dep_id)
    assert deploy_job.state == jobs.JobState.CANCELLED
    build = builder.get(BuildId(build_id))
    assert build.state == BuildState.CANCELLED and build.deployment_id == dep_id
    (stop_job,) = _jobs(world, "stop", dep_id)  # one for both requests
    _run_until_idle(world)
    with world.factory() as s:
        assert jobs.get(s, stop_job.id).state == jobs.JobState.SUCCEEDED
    assert world.records.get(dep_id).state == "stopped"
    events = _events(world, dep_id)
    states = [e.data.get("state") for e in events if e.phase == "state"]
    assert states == ["building", "stopping", "stopped"]
    assert "failed" not in [e.phase for e in events]
    messages = [e.message for e in events]
    assert (
        "stop requested while building: the deploy is interrupted, then the deployment's VMs "
        "deleted" in messages
    )
    assert any(m.startswith("deploy interrupted") for m in messages), messages
    assert messages.count(f"build {build_id} cancelled") == 1, messages
    assert _stop(world, owner, dep_id).status_code == 200
    assert _stop(world, other, dep_id).status_code == 404


def test_running_stops_through_one_stop_job_and_repeats_are_harmless(world: World) -> None:
    c = new_customer(world.gw)
    dep = _deploy(world, c)
    (deploy_job,) = _jobs(world, "deploy", dep["id"])
    for state in ("building", "deploying", "running"):
        world.records.set_state(dep["id"], state)
    with world.factory() as s, s.begin():  # its deploy job is done, as a worker leaves it
        claimed = jobs.claim(world.factory, ["deploy"], "w0", now=1e12)
        assert claimed is not None and claimed.id == deploy_job.id
        jobs.complete(s, deploy_job.id, "w0", now=1e12)
    first = _stop(world, c, dep["id"])
    assert first.status_code == 202, first.text
    assert first.json()["deployment"]["state"] == "stopping"
    second = _stop(world, c, dep["id"])
    assert second.status_code == 202 and second.json()["deployment"]["state"] == "stopping"
    (stop_job,) = _jobs(world, "stop", dep["id"])  # one job for both requests
    assert stop_job.state == jobs.JobState.QUEUED
    _run_until_idle(world)
    with world.factory() as s:
        assert jobs.get(s, stop_job.id).state == jobs.JobState.SUCCEEDED
    assert world.records.get(dep["id"]).state == "stopped"
    states = [e.data.get("state") for e in _events(world, dep["id"]) if e.phase == "state"]
    assert states == ["building", "deploying", "running", "stopping", "stopped"]
    done = _events(world, dep["id"])[-1]
    assert done.phase == "done" and done.message == "deployment stopped (no VMs left)"
    third = _stop(world, c, dep["id"])
    assert third.status_code == 200 and third.json()["deployment"]["state"] == "stopped"
    assert len(_jobs(world, "stop", dep["id"])) == 1


def test_failed_with_a_queued_retry_is_stopped_and_the_retry_never_runs(world: World) -> None:
    c = new_customer(world.gw)
    dep = _deploy(world, c)
    world.records.set_state(dep["id"], "building")
    world.records.set_state(dep["id"], "failed", error={"code": "vm_error", "message": "boom"})
    r = _stop(world, c, dep["id"])
    assert r.status_code == 202 and r.json()["deployment"]["state"] == "stopping"
    (deploy_job,) = _jobs(world, "deploy", dep["id"])
    assert deploy_job.state == jobs.JobState.CANCELLED
    _run_until_idle(world)
    assert world.records.get(dep["id"]).state == "stopped"


def test_a_deploy_stuck_after_its_job_gave_up_can_be_stopped(world: World) -> None:
    c = new_customer(world.gw)
    dep = _deploy(world, c)
    world.records.set_state(dep["id"], "building")
    (deploy_job,) = _jobs(world, "deploy", dep["id"])
    with world.factory() as s, s.begin():  # the worker died on its last attempt
        claimed = jobs.claim(world.factory, ["deploy"], "w0", now=1e12)
        assert claimed is not None and claimed.id == deploy_job.id
        jobs.fail(s, deploy_job.id, "w0", "lost", now=1e12, retryable=False)
    r = _stop(world, c, dep["id"])
    assert r.status_code == 202, r.text
    states = [e.data.get("state") for e in _events(world, dep["id"]) if e.phase == "state"]
    assert states == ["building", "failed", "stopping"]
    assert world.records.get(dep["id"]).error is not None
    _run_until_idle(world)
    assert world.records.get(dep["id"]).state == "stopped"


def test_a_deploy_whose_last_attempt_died_fails_its_deployment(world: World) -> None:
    """Nothing would move a deployment whose deploy job's last worker died: the worker that
    finds that lease expired fails it, saying why (before, it stayed building for ever)."""
    c = new_customer(world.gw)
    dep = _deploy(world, c)
    world.records.set_state(dep["id"], "building")
    (deploy_job,) = _jobs(world, "deploy", dep["id"])
    for attempt in range(1, deploy_job.max_attempts + 1):
        claimed = jobs.claim(world.factory, ["deploy"], f"dead-{attempt}", now=10.0, lease_s=1.0)
        assert claimed is not None and claimed.id == deploy_job.id
        if attempt < deploy_job.max_attempts:  # re-queued by some other process
            with world.factory() as s, s.begin():
                (requeued,) = jobs.requeue_expired(s, now=20.0, kinds=["deploy"])
            assert requeued.state == jobs.JobState.QUEUED
            assert world.records.get(dep["id"]).state == "building"
    assert world.worker.run_once() is False  # its requeue pass fails the job for good
    with world.factory() as s:
        assert jobs.get(s, deploy_job.id).state == jobs.JobState.FAILED
    failed = world.records.get(dep["id"])
    assert failed.state == "failed" and failed.error is not None
    assert failed.error["message"].startswith("the deploy's worker stopped heartbeating")
    assert failed.error["details"] == {"job_id": deploy_job.id}
    last = _events(world, dep["id"])[-1]
    assert last.phase == "failed" and last.data["final"] is True
    # a stop then finishes it, as for any failed deployment
    assert _stop(world, c, dep["id"]).status_code == 202
    _run_until_idle(world)
    assert world.records.get(dep["id"]).state == "stopped"


def test_stopping_whose_stop_job_died_gets_a_new_one(world: World) -> None:
    """A stop job whose worker died on its last attempt leaves the deployment stopping: the
    next stop starts a new job instead of answering "already stopping" forever."""
    c = new_customer(world.gw)
    dep = _deploy(world, c)
    world.records.set_state(dep["id"], "building")
    world.records.set_state(dep["id"], "failed", error={"code": "x", "message": "y"})
    assert _stop(world, c, dep["id"]).status_code == 202
    (dead,) = _jobs(world, "stop", dep["id"])
    with world.factory() as s, s.begin():
        claimed = jobs.claim(world.factory, ["stop"], "w0", now=1e12)
        assert claimed is not None and claimed.id == dead.id
        jobs.fail(s, dead.id, "w0", "worker lost its lease", now=1e12, retryable=False)
    again = _stop(world, c, dep["id"])
    assert again.status_code == 202 and again.json()["deployment"]["state"] == "stopping"
    live = [j for j in _jobs(world, "stop", dep["id"]) if j.id != dead.id]
    assert [j.state for j in live] == [jobs.JobState.QUEUED]
    assert _events(world, dep["id"])[-1].message.startswith("stop requested again")
    _run_until_idle(world)
    assert world.records.get(dep["id"]).state == "stopped"


def test_another_tenants_deployment_is_404_and_untouched(world: World) -> None:
    a, b = new_customer(world.gw), new_customer(world.gw)
    dep = _deploy(world, b)
    for target in (dep["id"], "dep_doesnotexist"):
        r = _stop(world, a, target)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
        assert b.id not in r.text and "stop-me" not in r.text
    assert world.records.get(dep["id"]).state == "accepted"
    assert _jobs(world, "stop", dep["id"]) == []
    (deploy_job,) = _jobs(world, "deploy", dep["id"])
    assert deploy_job.state == jobs.JobState.QUEUED
    out = run_unkey(world.gw, "deployments", "stop", dep["id"], api_key=a.key)
    assert out.code == 4 and "not found" in out.err, out
    # and B can: the CLI prints the state (stdout), the deployment with --json
    mine = run_unkey(world.gw, "deployments", "stop", dep["id"], "--json", api_key=b.key)
    assert mine.code == 0, mine
    assert '"state": "cancelled"' in mine.out
    with pytest.raises(NotFound), world.factory() as s:
        cp.get_deployment(s, dep["id"], tenant_id=a.tenant_id)


def test_the_deploy_worker_leaves_a_stopping_deployment_to_its_stop_job(world: World) -> None:
    """A deploy job left queued (e.g. re-queued after its worker crashed) never resumes a
    deployment the user stopped: stopping cannot go back to building."""
    c = new_customer(world.gw)
    dep = _deploy(world, c)
    world.records.set_state(dep["id"], "building")
    world.records.set_state(dep["id"], "failed", error={"code": "x", "message": "y"})
    world.records.set_state(dep["id"], "stopping")  # as a stop does, its job not run yet
    with pytest.raises(IllegalTransition):
        world.records.set_state(dep["id"], "building")
    assert world.worker.run_once()  # the deploy job: skipped, completed
    (deploy_job,) = _jobs(world, "deploy", dep["id"])
    assert deploy_job.state == jobs.JobState.SUCCEEDED
    assert deploy_job.result == {"state": "stopping"}


@pytest.mark.postgres
def test_stop_on_postgres(tmp_path: Path, postgres_fresh_url: str) -> None:
    """The thread-pool path with the row lock: the answers and the single job, as on SQLite.
    Its own database: the worker below claims every deploy/stop job in the queue."""
    with running_gateway(tmp_path / "gw", database_url=postgres_fresh_url) as gw:
        engine = db.make_engine(postgres_fresh_url)
        factory = db.session_factory(engine)
        scheduler = Scheduler(engine)
        vms = MetaldVms(scheduler, lambda a: (_ for _ in ()).throw(AssertionError(a)))
        w = World(gw, factory, cp.DeploymentRecords(factory),
                  DeployWorker(factory, NoBuilds(), vms, worker_id="pg-stop-worker"))  # fmt: skip
        try:
            c = new_customer(gw)
            cancelled, running = _deploy(w, c), _deploy(w, c)
            assert _stop(w, c, cancelled["id"]).json()["deployment"]["state"] == "cancelled"
            w.records.set_state(running["id"], "building")  # its deploy job queued
            answers = [_stop(w, c, running["id"]) for _ in range(3)]
            assert [r.status_code for r in answers] == [202, 202, 202]
            assert len(_jobs(w, "stop", running["id"])) == 1
            (deploy_job,) = _jobs(w, "deploy", running["id"])
            assert deploy_job.state == jobs.JobState.CANCELLED
            _run_until_idle(w)
            assert w.records.get(running["id"]).state == "stopped"
            assert _stop(w, c, running["id"]).status_code == 200
        finally:
            scheduler.close()
            engine.dispose()


def _stopping(w: World, c: Customer) -> tuple[str, jobs.Job]:
    """A failed deployment the user stopped: ``stopping``, its stop job queued."""
    dep_id = _deploy(w, c)["id"]
    w.records.set_state(dep_id, "building")
    w.records.set_state(dep_id, "failed", error={"code": "x", "message": "y"})
    assert _stop(w, c, dep_id).status_code == 202
    (stop_job,) = _jobs(w, "stop", dep_id)
    return dep_id, stop_job


def _claimed_by_a_dying_worker(w: World, job_id: str, worker: str) -> None:
    """Claimed long ago by a worker that died: its lease is long expired."""
    claimed = jobs.claim(w.factory, ["stop"], worker, now=10.0, lease_s=1.0)
    assert claimed is not None and claimed.id == job_id


def test_a_stop_whose_worker_died_is_retried_while_the_deployment_stays_stopping(
    world: World,
) -> None:
    c = new_customer(world.gw)
    dep_id, stop_job = _stopping(world, c)
    _claimed_by_a_dying_worker(world, stop_job.id, "dead-1")
    assert world.worker.run_once()  # its requeue pass records the lost attempt, then the retry
    with world.factory() as s:
        done = jobs.get(s, stop_job.id)
    assert done.state == jobs.JobState.SUCCEEDED and done.attempts == 2
    assert world.records.get(dep_id).state == "stopped"
    events = _events(world, dep_id)
    states = [e.data.get("state") for e in events if e.phase == "state"]
    assert states == ["building", "failed", "stopping", "stopped"]  # never failed again
    (lost,) = [e for e in events if e.data.get("retrying")]
    assert lost.phase == "stop" and lost.message == (
        "stop attempt 1/3 failed: the stop's worker stopped heartbeating (crashed or stalled);"
        " retrying in 0 s"
    )


def test_a_stop_whose_last_attempt_died_leaves_the_deployment_failed_for_good(
    world: World,
) -> None:
    """``failed`` after a stop means no attempt is left: recorded by the worker that finds the
    last attempt's lease expired. A new stop then finishes it."""
    c = new_customer(world.gw)
    dep_id, stop_job = _stopping(world, c)
    for attempt in (1, 2):  # re-queued by some process that is not a deployer worker
        _claimed_by_a_dying_worker(world, stop_job.id, f"dead-{attempt}")
        with world.factory() as s, s.begin():
            (requeued,) = jobs.requeue_expired(s, now=20.0, kinds=["stop"])
        assert requeued.state == jobs.JobState.QUEUED
        assert world.records.get(dep_id).state == "stopping"
    _claimed_by_a_dying_worker(world, stop_job.id, "dead-3")
    assert world.worker.run_once() is False  # nothing left to claim: the job failed for good
    with world.factory() as s:
        assert jobs.get(s, stop_job.id).state == jobs.JobState.FAILED
    dep = world.records.get(dep_id)
    assert dep.state == "failed" and dep.error is not None
    assert dep.error["message"] == "the stop's worker stopped heartbeating (crashed or stalled)"
    assert dep.error["details"] == {"job_id": stop_job.id}
    last = _events(world, dep_id)[-1]
    assert last.phase == "failed" and last.data["final"] is True
    assert last.message.startswith("stop failed: the stop's worker stopped heartbeating")
    again = _stop(world, c, dep_id)
    assert again.status_code == 202 and again.json()["deployment"]["state"] == "stopping"
    _run_until_idle(world)
    assert world.records.get(dep_id).state == "stopped"
