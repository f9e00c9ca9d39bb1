"""The deployer worker: claims ``deploy`` and ``stop`` jobs (the gateway's route decisions) and
runs them (:func:`.workflow.run_deploy`, :func:`.workflow.run_stop`)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ..appspec import AppSpec, parse_size
from ..core import metrics
from ..core.clock import SYSTEM_CLOCK, Clock
from ..core.errors import IllegalTransition, UnkeyError
from ..core.log import bound, event, get
from ..store import jobs
from ..store.controlplane import Deployment, DeploymentRecords
from .api import Builds, DeployRequest, Vms
from .workflow import run_deploy, run_stop

JOB_KIND = "deploy"
STOP_JOB_KIND = "stop"
JOB_KINDS = (JOB_KIND, STOP_JOB_KIND)
# A deploy job finds its deployment in one of these: nothing to do (deployed already, or the
# user cancelled or stopped it: a stop job owns it now).
_DEPLOY_SKIPS = frozenset({"running", "stopping", "stopped", "cancelled"})
log = get("deployer")


def request_from(dep: Deployment) -> DeployRequest:
    """The workflow's request from the recorded (already validated) deployment."""
    spec = AppSpec.model_validate(dep.spec)
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
    )


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
    ) -> None:
        self.factory = factory
        self.builds = builds
        self.vms = vms
        self.records = DeploymentRecords(factory, clock)
        self.worker_id = worker_id
        self.clock = clock
        self.lease_s = lease_s
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _now(self) -> float:
        return self.clock.time_ns() / 1e9

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue had nothing for us."""
        with self.factory() as s, s.begin():
            jobs.requeue_expired(s, now=self._now(), kinds=JOB_KINDS)
        job = jobs.claim(
            self.factory, JOB_KINDS, self.worker_id, now=self._now(), lease_s=self.lease_s
        )
        if job is None:
            return False
        dep_id = str(job.payload["deployment_id"])
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(self.lease_s / 3):
                with (
                    contextlib.suppress(UnkeyError),
                    self.factory() as s,
                    s.begin(),
                ):
                    jobs.heartbeat(s, job.id, self.worker_id, now=self._now(), lease_s=self.lease_s)

        hb = threading.Thread(target=heartbeat, name=f"hb-{job.id}", daemon=True)
        hb.start()
        ids: dict[str, Any] = {"deployment_id": dep_id, "job_kind": job.kind}
        try:
            dep = self.records.get(dep_id)
            ids.update(request_id=dep.request_id, customer_id=dep.customer_id)
            with bound(**ids):
                if job.kind == STOP_JOB_KIND:
                    result = self._run_stop(dep, job.attempts)
                else:
                    result = self._run_deploy(dep, job.attempts)
            done.set()
            with self.factory() as s, s.begin():
                jobs.complete(s, job.id, self.worker_id, now=self._now(), result=result)
        except UnkeyError as exc:
            done.set()
            what = "stop" if job.kind == STOP_JOB_KIND else "deploy"
            (metrics.STOPS if job.kind == STOP_JOB_KIND else metrics.DEPLOYS).labels("failed").inc()
            with bound(**ids):
                event(log, f"{what} failed", level=logging.WARNING, error=exc.to_dict())
            with contextlib.suppress(IllegalTransition), self.factory() as s, s.begin():
                jobs.fail(
                    s, job.id, self.worker_id, exc.message, now=self._now(), retryable=exc.retryable
                )
        finally:
            done.set()
        return True

    def _run_deploy(self, dep: Deployment, attempt: int) -> dict[str, Any]:
        event(log, "deploy started", attempt=attempt, state=dep.state)
        if dep.state in _DEPLOY_SKIPS:
            return {"state": dep.state}
        t0 = time.monotonic()
        try:
            launched = run_deploy(
                request_from(dep), self.builds, self.vms, self.records, current_state=dep.state
            )
        except IllegalTransition:
            # the user cancelled or stopped it between our claim and our first move: done
            now = self.records.get(dep.id).state
            if now in _DEPLOY_SKIPS:
                event(log, "deploy skipped", state=now)
                return {"state": now}
            raise
        result: dict[str, Any] = {"vms": [v.vm_id for v in launched]}
        seconds = time.monotonic() - t0
        metrics.DEPLOYS.labels("ready").inc()
        metrics.DEPLOY_SECONDS.observe(seconds)
        event(log, "deploy ready", vms=result["vms"], seconds=round(seconds, 3))
        return result

    def _run_stop(self, dep: Deployment, attempt: int) -> dict[str, Any]:
        event(log, "stop started", attempt=attempt, state=dep.state)
        t0 = time.monotonic()
        deleted = run_stop(dep.id, self.vms, self.records, current_state=dep.state)
        metrics.STOPS.labels("stopped").inc()
        event(log, "deployment stopped", vms=deleted, seconds=round(time.monotonic() - t0, 3))
        return {"state": "stopped", "vms": deleted}

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
