"""The deployer worker: claims ``deploy`` and ``stop`` jobs (the gateway's route decisions) and
runs them (:func:`.workflow.run_deploy`, :func:`.workflow.run_stop`).

A user's stop of a deploy in progress (``building``/``deploying``) asks its deploy job to cancel
and enqueues a stop job. The deploy's worker sees ``cancel_requested`` within
``cancel_poll_s`` (its watcher thread reads the job that often and heartbeats it every third of
the lease), interrupts the deploy (cancels its build, deletes the VM a launch waits for), then
deletes everything the deploy created and acknowledges the cancel. The stop job first waits for
the deploy job to end (a dead worker's job ends when its lease expires), then deletes whatever
is left and records ``stopped``.

A failed stop attempt that will be retried leaves the deployment ``stopping`` (an event says
so); it is recorded ``failed``, in the transaction that fails the job for good, only when no
attempt is left (or the error is not retryable), or when a worker finds that the stop job's
last worker lost its lease on the last attempt. So ``failed`` after a stop is final.

A failed deploy attempt that will be retried leaves the deployment ``building``/``deploying``
(a ``retry`` event says why and when; the attempt's VMs are deleted): it is recorded ``failed``
only by its last attempt, or for an error no retry can fix, so ``failed`` is final there too.

A deploy job whose last attempt's worker died fails its deployment the same way (found by any
worker's requeue pass; the VMs that worker may have booted are deleted): nothing else would
ever move it out of ``building``/``deploying``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ..appspec import parse_size, validate_data
from ..core import metrics
from ..core.clock import SYSTEM_CLOCK, Clock
from ..core.errors import (
    DeadlineExceeded,
    IllegalTransition,
    InvalidInput,
    NotFound,
    UnkeyError,
    ValidationFailed,
)
from ..core.log import bound, event, get
from ..store import controlplane as cp
from ..store import jobs
from ..store.controlplane import Deployment, DeploymentRecords
from .api import Builds, DeployRequest, Interrupted, Interruption, Vms
from .workflow import run_deploy, run_stop, wind_down

JOB_KIND = "deploy"
STOP_JOB_KIND = "stop"
JOB_KINDS = (JOB_KIND, STOP_JOB_KIND)
# A deploy job finds its deployment in one of these: nothing to do (deployed already, or the
# user cancelled or stopped it: a stop job owns it now).
_DEPLOY_SKIPS = frozenset({"running", "stopping", "stopped", "cancelled"})
log = get("deployer")


def request_from(dep: Deployment) -> DeployRequest:
    """The workflow's request from the recorded (already validated) deployment; InvalidInput
    naming the problems when it no longer validates (accepted under older, looser rules)."""
    try:
        spec = validate_data(dep.spec)
    except ValidationFailed as exc:
        named = "; ".join(f"{p.loc}: {p.msg}" for p in exc.problems)
        raise InvalidInput(
            f"the recorded app spec of {dep.id} is no longer valid: {named}",
            suggestion="deploy the app again with a corrected app.yaml",
        ) from None
    return DeployRequest(
        deployment_id=dep.id,
        customer_id=dep.customer_id,
        tenant_id=dep.tenant_id,
        request_id=dep.request_id,
        name=spec.name,
        image=spec.image,
        vcpus=spec.resources.cpu,
        memory_bytes=parse_size(spec.resources.memory, what="memory"),
        port=spec.port,
        env=dict(spec.env),
        command=tuple(spec.command) if spec.command is not None else None,
        args=tuple(spec.args) if spec.args is not None else None,
        keep_shell=spec.keep_shell,
        replicas=spec.replicas,
        healthcheck_path=spec.healthcheck.path if spec.healthcheck else "/",
        healthcheck_port=spec.healthcheck.port if spec.healthcheck else None,
    )


@dataclass(frozen=True)
class _Outcome:
    """How a job ends: completed with ``result``, or its cancel acknowledged."""

    result: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False


class DeployWorker:
    """One worker thread; several may run (in one or many processes) on the same queue."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        builds: Builds,
        vms: Vms,
        *,
        worker_id: str,
        clock: Clock = SYSTEM_CLOCK,
        lease_s: float = 60.0,
        poll_s: float = 0.2,
        cancel_poll_s: float = 0.25,
        deploy_wait_s: float = 300.0,
    ) -> None:
        self.factory = factory
        self.builds = builds
        self.vms = vms
        self.records = DeploymentRecords(factory, clock)
        self.worker_id = worker_id
        self.clock = clock
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.cancel_poll_s = cancel_poll_s
        self.deploy_wait_s = deploy_wait_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _now(self) -> float:
        return self.clock.time_ns() / 1e9

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue had nothing for us."""
        with self.factory() as s, s.begin():
            abandoned = self._requeue_expired(s, JOB_KINDS)
        self._abandon(abandoned)
        job = jobs.claim(
            self.factory, JOB_KINDS, self.worker_id, now=self._now(), lease_s=self.lease_s
        )
        if job is None:
            return False
        dep_id = str(job.payload["deployment_id"])
        done = threading.Event()
        interruption = Interruption(lambda: self._cancel_requested(job.id))
        ids: dict[str, Any] = {"deployment_id": dep_id, "job_kind": job.kind}
        # the watcher logs with the same ids (a thread has no log context of its own): it reads
        # the latest binding of ``ids``, which is replaced, never changed in place
        watcher = threading.Thread(target=self._watch, name=f"hb-{job.id}", daemon=True,
                                   args=(job, dep_id, interruption, done, lambda: ids))  # fmt: skip
        watcher.start()
        try:
            dep = self.records.get(dep_id)
            ids = {**ids, "request_id": dep.request_id, "customer_id": dep.customer_id}
            with bound(**ids):
                if job.kind == STOP_JOB_KIND:
                    outcome = self._run_stop(dep, job.attempts)
                else:
                    outcome = self._run_deploy(dep, job, interruption)
            done.set()
            watcher.join(10)
            with self.factory() as s, s.begin():
                if outcome.cancelled:
                    jobs.acknowledge_cancel(s, job.id, self.worker_id, now=self._now())
                else:
                    jobs.complete(s, job.id, self.worker_id, now=self._now(),
                                  result=outcome.result)  # fmt: skip
        except UnkeyError as exc:
            done.set()
            watcher.join(10)
            what = "stop" if job.kind == STOP_JOB_KIND else "deploy"
            (metrics.STOPS if job.kind == STOP_JOB_KIND else metrics.DEPLOYS).labels("failed").inc()
            with bound(**ids):
                event(log, f"{what} failed", level=logging.WARNING, error=exc.to_dict())
            with contextlib.suppress(IllegalTransition), self.factory() as s, s.begin():
                after = jobs.fail(
                    s, job.id, self.worker_id, exc.message, now=self._now(), retryable=exc.retryable
                )
                if job.kind == STOP_JOB_KIND:
                    self._stop_attempt_failed(s, dep_id, after, exc.to_dict())
                elif after.state == jobs.JobState.QUEUED:
                    self._deploy_attempt_failed(s, dep_id, after, exc.to_dict())
                elif after.state == jobs.JobState.FAILED:
                    self._deploy_failed(s, dep_id, after, exc.to_dict())
        finally:
            done.set()
        return True

    # -- the deploy job's watcher ---------------------------------------------------------------
    def _cancel_requested(self, job_id: str) -> bool:
        with self.factory() as s:
            return jobs.get(s, job_id).cancel_requested

    def _watch(
        self,
        job: jobs.Job,
        dep_id: str,
        interruption: Interruption,
        done: threading.Event,
        ids: Callable[[], dict[str, Any]],
    ) -> None:
        """Heartbeat the job every third of its lease; for a deploy job, also look for a
        cancel request every ``cancel_poll_s`` and interrupt the deploy once there is one:
        cancel its build and ask for its VMs' deletion (again on every look, so a VM a launch
        creates meanwhile goes too), which ends a launch waiting for its VM at once."""
        deploy = job.kind == JOB_KIND
        beat_every = self.lease_s / 3
        last_beat = time.monotonic()
        while not done.wait(min(self.cancel_poll_s, beat_every) if deploy else beat_every):
            try:
                if time.monotonic() - last_beat >= beat_every:
                    with self.factory() as s, s.begin():
                        seen = jobs.heartbeat(s, job.id, self.worker_id, now=self._now(),
                                              lease_s=self.lease_s)  # fmt: skip
                    last_beat = time.monotonic()
                elif deploy:
                    with self.factory() as s:
                        seen = jobs.get(s, job.id)
                else:
                    continue
                if not deploy:
                    continue
                if seen.cancel_requested and not interruption.is_set():
                    interruption.set()
                    with bound(**ids()):
                        event(log, "stop requested: interrupting the deploy",
                              build_id=interruption.build_id)  # fmt: skip
                    build_id = interruption.build_id
                    if build_id is not None and self.builds.cancel(build_id, dep_id):
                        self.records.event(dep_id, "build", f"build {build_id} cancelled",
                                           build_id=build_id)  # fmt: skip
                if interruption.is_set():
                    self._abort_vms(dep_id, "the deploy is interrupted")
            except Exception as exc:
                # the database or metald hiccuped, or the lease is lost: the watcher must outlive
                # it (the next look retries), like the worker loop outlives a job's bug
                with bound(**ids()):
                    event(log, "job watcher", level=logging.WARNING, error=repr(exc))

    # -- deploy ---------------------------------------------------------------------------------
    def _run_deploy(self, dep: Deployment, job: jobs.Job, interruption: Interruption) -> _Outcome:
        event(log, "deploy started", attempt=job.attempts, state=dep.state)
        if dep.state in _DEPLOY_SKIPS:
            return _Outcome({"state": dep.state})
        t0 = time.monotonic()

        def will_retry(exc: UnkeyError) -> bool:
            # what jobs.fail will decide (a cancel requested meanwhile is the user's stop)
            return exc.retryable and job.attempts < job.max_attempts

        try:
            launched = run_deploy(request_from(dep), self.builds, self.vms, self.records,
                                  current_state=dep.state, interruption=interruption,
                                  will_retry=will_retry)  # fmt: skip
        except Interrupted as why:
            # the user cancelled or stopped it: delete what we created, leave the rest to them
            deleted = wind_down(dep.id, self.builds, self.vms, self.records,
                                interruption=interruption, why=why)  # fmt: skip
            now = self.records.get(dep.id).state
            metrics.DEPLOYS.labels("interrupted").inc()
            event(log, "deploy interrupted", state=now, vms=deleted, reason=str(why),
                  seconds=round(time.monotonic() - t0, 3))  # fmt: skip
            result: dict[str, Any] = {"state": now}
            if deleted:
                result["vms_deleted"] = deleted
            return _Outcome(result, cancelled=interruption.confirmed())
        result = {"vms": [v.vm_id for v in launched]}
        seconds = time.monotonic() - t0
        metrics.DEPLOYS.labels("ready").inc()
        metrics.DEPLOY_SECONDS.observe(seconds)
        event(log, "deploy ready", vms=result["vms"], seconds=round(seconds, 3))
        return _Outcome(result)

    # -- stop -----------------------------------------------------------------------------------
    def _run_stop(self, dep: Deployment, attempt: int) -> _Outcome:
        event(log, "stop started", attempt=attempt, state=dep.state)
        t0 = time.monotonic()
        if self._await_deploy(dep):
            dep = self.records.get(dep.id)  # the interrupted deploy may have moved it
        deleted = run_stop(dep.id, self.vms, self.records, current_state=dep.state)
        metrics.STOPS.labels("stopped").inc()
        event(log, "deployment stopped", vms=deleted, seconds=round(time.monotonic() - t0, 3))
        return _Outcome({"state": "stopped", "vms": deleted})

    def _await_deploy(self, dep: Deployment) -> bool:
        """Wait until the deployment's deploy job has ended (asking it to cancel first if it
        has not been asked): a stop never races the VMs a deploy launches. A dead worker's job
        ends when its lease expires. True if there was a deploy to wait for."""
        if not dep.job_id:
            return False
        deadline = time.monotonic() + self.deploy_wait_s
        waited = False
        while True:
            with self.factory() as s, s.begin():
                abandoned = self._requeue_expired(s, (JOB_KIND,))
                try:
                    deploy = jobs.get(s, dep.job_id)
                except NotFound:
                    deploy = None
                if deploy and deploy.state not in jobs.FINISHED and not deploy.cancel_requested:
                    deploy = jobs.cancel(s, deploy.id, now=self._now())
            self._abandon(abandoned)
            if deploy is None:
                return waited
            if deploy.state in jobs.FINISHED:
                return waited
            if not waited:
                waited = True
                self.records.event(
                    dep.id, "stop", f"waiting for the deploy (job {deploy.id}) to stop and "
                    "delete what it created", job_id=deploy.id,
                )  # fmt: skip
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"the deploy job {deploy.id} of deployment {dep.id} did not stop within "
                    f"{self.deploy_wait_s:.0f} s of its cancel request",
                    suggestion="check the deployer's log; the stop is retried",
                )
            time.sleep(0.1)

    def _deploy_attempt_failed(
        self, s: Session, dep_id: str, after: jobs.Job, error: dict[str, Any]
    ) -> None:
        """A deploy attempt failed and its job is queued again: an event says why and when
        (the deployment stays ``building``/``deploying``; ``failed`` is for the last one)."""
        now = self._now()
        retry_in = max(after.not_before - now, 0.0)
        cp.add_event(s, dep_id, "retry", f"deploy attempt {after.attempts}/{after.max_attempts} "
                     f"failed: {error.get('message', '')}; retrying in {retry_in:.0f} s", now=now,
                     data={"error": error, "attempt": after.attempts,
                           "max_attempts": after.max_attempts, "retrying": True})  # fmt: skip

    def _deploy_failed(
        self, s: Session, dep_id: str, after: jobs.Job, error: dict[str, Any]
    ) -> None:
        """The deploy job failed for good: its deployment fails too, in the job's transaction,
        unless the workflow recorded it already (or a stop moved it): an error raised before
        the workflow ran (its request could not be made) would otherwise leave it as it was."""
        now = self._now()
        try:
            cp.record_state(s, dep_id, "failed", now=now, error=error,
                            only_from=("accepted", "building", "deploying"))  # fmt: skip
        except (NotFound, IllegalTransition):
            return
        cp.add_event(s, dep_id, "failed", f"deploy failed: {error.get('message', '')}", now=now,
                     data={"error": error, "attempt": after.attempts, "final": True})  # fmt: skip

    def _stop_attempt_failed(
        self, s: Session, dep_id: str, after: jobs.Job, error: dict[str, Any]
    ) -> None:
        """Record a failed stop attempt in the job's own transaction: an event while the job
        will be retried (the deployment stays ``stopping``), ``failed`` once it will not."""
        now = self._now()
        message = str(error.get("message", ""))
        if after.state == jobs.JobState.QUEUED:
            retry_in = max(after.not_before - now, 0.0)
            cp.add_event(s, dep_id, "stop", f"stop attempt {after.attempts}/{after.max_attempts} "
                         f"failed: {message}; retrying in {retry_in:.0f} s", now=now,
                         data={"error": error, "attempt": after.attempts,
                               "max_attempts": after.max_attempts, "retrying": True})  # fmt: skip
            return
        if cp.get_deployment(s, dep_id, tenant_id=None).state != "stopping":
            return  # it failed before moving the deployment: nothing of it to record as failed
        cp.record_state(s, dep_id, "failed", now=now, error=error)
        cp.add_event(s, dep_id, "failed", f"stop failed: {message}", now=now,
                     data={"error": error, "attempt": after.attempts, "final": True})  # fmt: skip

    def _requeue_expired(self, s: Session, kinds: tuple[str, ...]) -> list[str]:
        """Jobs whose worker stopped heartbeating go back to the queue (or fail for good); a
        stop job's fate is the deployment's, recorded as :meth:`_stop_attempt_failed` does; a
        deploy job that failed for good fails its deployment. Returns the deployments whose VMs
        the caller must delete once this transaction is committed (:meth:`_abandon`)."""
        abandoned: list[str] = []
        for job in jobs.requeue_expired(s, now=self._now(), kinds=kinds):
            if job.kind == JOB_KIND and job.state == jobs.JobState.FAILED:
                if self._deploy_lost(s, job):
                    abandoned.append(str(job.payload.get("deployment_id", "")))
                continue
            if job.kind != STOP_JOB_KIND or job.state == jobs.JobState.CANCELLED:
                continue
            dep_id = str(job.payload.get("deployment_id", ""))
            lost = UnkeyError(
                "the stop's worker stopped heartbeating (crashed or stalled)",
                retryable=True,
                details={"job_id": job.id},
            )
            with contextlib.suppress(NotFound):
                self._stop_attempt_failed(s, dep_id, job, lost.to_dict())
        return abandoned

    def _deploy_lost(self, s: Session, job: jobs.Job) -> bool:
        """The deploy job's last worker stopped heartbeating on its last attempt: nothing will
        move its deployment any more, so it fails (in the job's transaction), saying why. True
        if it was recorded (the VMs that worker may have booted are then the caller's to
        delete)."""
        dep_id = str(job.payload.get("deployment_id", ""))
        now = self._now()
        error = UnkeyError(
            f"the deploy's worker stopped heartbeating (crashed or stalled) on its last attempt"
            f" ({job.attempts}/{job.max_attempts})",
            retryable=False, details={"job_id": job.id},
        ).to_dict()  # fmt: skip
        try:
            cp.record_state(s, dep_id, "failed", now=now, error=error,
                            only_from=("accepted", "building", "deploying"))  # fmt: skip
        except (NotFound, IllegalTransition):
            return False  # stopped, or over, meanwhile: not the deploy's to record
        cp.add_event(s, dep_id, "failed", f"deploy failed: {error['message']}", now=now,
                     data={"error": error, "attempt": job.attempts, "final": True})  # fmt: skip
        metrics.DEPLOYS.labels("failed").inc()
        return True

    def _abort_vms(self, dep_id: str, why: str) -> None:
        """Ask metald to delete the deployment's VMs (without waiting), an event for each."""
        for vm_id in self.vms.abort(dep_id):
            self.records.event(dep_id, "vm", f"deleting {vm_id}: {why}", vm_id=vm_id)

    def _abandon(self, deployment_ids: list[str]) -> None:
        """Delete the VMs of deployments whose deploy was lost (after the transaction that
        failed them: metald has its own)."""
        for dep_id in deployment_ids:
            try:
                self._abort_vms(dep_id, "its deploy was lost")
            except UnkeyError as exc:
                event(log, "deleting a lost deploy's VMs", level=logging.WARNING,
                      deployment_id=dep_id, error=exc.to_dict())  # fmt: skip

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    worked = self.run_once()
                except Exception:  # a bug must not kill the worker; the job's lease expires
                    log.exception("deployer worker error")
                    worked = False
                if not worked:
                    self._stop.wait(self.poll_s)

        self._thread = threading.Thread(target=loop, name=self.worker_id, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
