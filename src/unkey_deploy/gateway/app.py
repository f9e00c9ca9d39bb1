"""The gatewayd ASGI app: routes, request ids, error mapping, metrics and the route decision.

``create_app(settings, routers=[...])`` builds the app; the database schema must already be
migrated (``store.db.upgrade``; ``unkey gatewayd`` does it at start). Errors are mapped to HTTP
only here: a :class:`~unkey_deploy.core.errors.UnkeyError` becomes its ``http_status`` with body
``{"error": err.to_dict(), "request_id": ...}``.

The route decision: ``POST /v1/deploy`` validates the app spec, enriches it (customer, tenant,
request id, timestamp), records the deployment (state ``accepted``) and enqueues a ``deploy`` job
(:mod:`unkey_deploy.store.jobs`) in the same transaction; the deploy workflow consumes it.
``DELETE /v1/deployments/{id}`` is the way back: it cancels an accepted deployment, or records it
``stopping`` and enqueues a ``stop`` job (the deployer deletes its VMs; a deploy still at work
has its job asked to cancel first), in one transaction.

Operator routes (admin token): customers, and the metald hosts (``GET /v1/hosts``,
``DELETE /v1/hosts/{id}`` forgets a lost host) through metald's :class:`Scheduler` over the same
database, with the asset manager the deployer uses (:class:`HostsAccess`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import appspec
from ..builder.api import LOCAL_SOURCES
from ..core import log
from ..core import metrics as core_metrics
from ..core.clock import SYSTEM_CLOCK, Clock
from ..core.config import Settings
from ..core.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    Problem,
    RateLimited,
    UnkeyError,
    ValidationFailed,
)
from ..core.ids import new_deployment_id, new_request_id
from ..metald.api import Scheduler
from ..store import controlplane as cp
from ..store import db, jobs
from . import schemas as s
from .auth import Authenticator, GatewayState, Principal, require_admin, require_principal, state_of
from .ratelimit import TokenBuckets

DEPLOY_JOB_KIND = "deploy"
STOP_JOB_KIND = "stop"
_log = log.get("unkey.gateway")

Json = dict[str, Any]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": s.ErrorResponse} for code in (401, 404, 409, 422, 429)
}


def _request_id(request: Request) -> str:
    rid: str = request.state.request_id
    return rid


def _json(body: Json, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: UnkeyError, request_id: str) -> JSONResponse:
    body = exc.to_dict()
    headers = {}
    if isinstance(exc, RateLimited):
        body["retry_after"] = exc.retry_after
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    return JSONResponse(
        {"error": body, "request_id": request_id}, status_code=exc.http_status, headers=headers
    )


class RequestContext:
    """Pure ASGI middleware: request id, body-size cap, X-Request-Id, metrics, access log."""

    def __init__(self, app: ASGIApp, *, max_body: int, registry: CollectorRegistry) -> None:
        self.app = app
        self.max_body = max_body
        self.requests = Counter(
            "unkey_gateway_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "unkey_gateway_request_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500
        if "\0" in scope["path"] or b"%00" in scope["query_string"]:
            # ids and filters reach the database, and PostgreSQL text cannot hold a NUL
            exc = InvalidInput("the URL contains a NUL character (%00)")
            resp = error_response(exc, rid)
            resp.headers["X-Request-Id"] = rid
            await resp(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_body
                except ValueError:
                    too_big = True
                if too_big:
                    exc = InvalidInput(f"request body is larger than {self.max_body} bytes")
                    resp = error_response(exc, rid)
                    resp.headers["X-Request-Id"] = rid
                    await resp(scope, receive, send)
                    return

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        received = 0

        async def receive_capped() -> Message:
            # A body without Content-Length (chunked) is counted as it comes: past the cap the
            # read fails (FastAPI passes an HTTPException through) instead of buffering it all.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise StarletteHTTPException(
                        413, f"request body is larger than {self.max_body} bytes"
                    )
            return message

        with log.bound(request_id=rid):
            try:
                await self.app(scope, receive_capped, send_wrapper)
            finally:
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                elapsed = time.perf_counter() - started
                self.requests.labels(scope["method"], path, str(status)).inc()
                self.latency.labels(scope["method"], path).observe(elapsed)
                if _log.isEnabledFor(logging.INFO):
                    principal = scope["state"].get("principal")
                    log.event(
                        _log,
                        "request",
                        method=scope["method"],
                        path=scope["path"],
                        route=path,
                        status=status,
                        ms=round(elapsed * 1000, 2),
                        customer_id=getattr(principal, "customer_id", None),
                    )


_NOT_AN_OBJECT = frozenset({"model_type", "model_attributes_type", "dict_type"})


def _body_problem(request: Request, error: Any) -> Problem | None:
    """Say what a body that is no JSON object at all is (pydantic only says what it is not)."""
    if tuple(error.get("loc", ())) != ("body",):
        return None
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    json_ctype = ctype == "application/json" or ctype.endswith("+json")
    if error.get("type") == "missing":
        return Problem("", "the body is empty: send a JSON object (Content-Type: application/json)")
    if error.get("type") not in _NOT_AN_OBJECT:
        return None
    if not json_ctype:
        return Problem("", "the body must be JSON sent with Content-Type: application/json "
                           f"(got {ctype or 'no Content-Type'})")  # fmt: skip
    got = error.get("input")
    kind = {list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(got), type(got).__name__)  # fmt: skip
    return Problem("", f"the body must be a JSON object, not {kind}")


def _install_error_handlers(app: FastAPI) -> None:
    async def unkey_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, UnkeyError):  # pragma: no cover - registered for this type
            raise exc
        return error_response(exc, _request_id(request))

    async def validation_error(request: Request, exc: Exception) -> Response:
        if not isinstance(
            exc, RequestValidationError
        ):  # pragma: no cover - registered for this type
            raise exc
        errors = exc.errors()
        problems = [_body_problem(request, e) or p
                    for e, p in zip(errors, appspec.problems_of(errors), strict=True)]  # fmt: skip
        named = ", ".join(p.loc or "(body)" for p in problems[:5])
        err = ValidationFailed(f"invalid request: {named}", problems)
        return error_response(err, _request_id(request))

    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(
            exc, StarletteHTTPException
        ):  # pragma: no cover - registered for this type
            raise exc
        err: UnkeyError
        if exc.status_code == 404:
            err = NotFound(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 405:
            err = InvalidInput(f"method {request.method} is not allowed on {request.url.path}")
        elif 400 <= exc.status_code < 500:
            # e.g. a body that is not JSON: the caller's mistake, not an internal error.
            err = InvalidInput(str(exc.detail))
        else:
            err = UnkeyError(str(exc.detail))
        resp = error_response(err, _request_id(request))
        if exc.status_code == 405:
            resp.status_code = 405
        return resp

    async def unexpected(request: Request, exc: Exception) -> Response:
        _log.exception("unhandled error")
        err = UnkeyError("internal error", suggestion=f"report request_id {_request_id(request)}")
        return error_response(err, _request_id(request))

    app.add_exception_handler(UnkeyError, unkey_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _deploy_payload(
    deployment_id: str, principal: Principal, request_id: str, spec: appspec.AppSpec, now: float
) -> Json:
    """The job payload: the fields of ``deployer.api.DeployRequest`` plus the full spec."""
    return {
        "deployment_id": deployment_id,
        "customer_id": principal.customer_id,
        "tenant_id": principal.tenant_id,
        "request_id": request_id,
        "accepted_at": now,
        "name": spec.name,
        "image": spec.image,
        "vcpus": spec.resources.cpu,
        "memory_bytes": spec.memory_bytes,
        "disk_bytes": spec.resources.disk_bytes,
        "port": spec.port,
        "env": dict(spec.env),
        "command": spec.command,
        "args": spec.args,
        "keep_shell": spec.keep_shell,
        "replicas": spec.replicas,
        "healthcheck_path": spec.healthcheck.path if spec.healthcheck else "/",
        "region": spec.region,
        "spec": spec.model_dump(mode="json"),
    }


def _body_hash(spec: appspec.AppSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def accept_deployment(
    factory: sessionmaker[Session],
    clock: Clock,
    principal: Principal,
    spec: appspec.AppSpec,
    *,
    request_id: str,
    idempotency_key: str | None,
    write_lock: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[int, Json, bool]:
    """Record + enqueue in one transaction; returns (status, body, replayed).

    ``write_lock`` serializes writers in this process; on SQLite that replaces the busy-wait of
    concurrent writers (which sleeps and makes the latency tail long) with a plain queue.
    """
    write_lock = write_lock or contextlib.nullcontext()
    digest = _body_hash(spec) if idempotency_key else ""
    for _attempt in range(2):
        try:
            with write_lock, db.transaction(factory) as session:
                if idempotency_key:
                    rec = cp.get_idempotency(session, principal.customer_id, idempotency_key)
                    if rec is not None:
                        if rec.request_hash != digest:
                            raise Conflict(
                                "this Idempotency-Key was already used with a different body",
                                suggestion="use a new Idempotency-Key for a different request",
                                details={"idempotency_key": idempotency_key},
                            )
                        return rec.status_code, rec.response, True
                now = clock.time_ns() / 1e9
                dep_id = new_deployment_id()
                # The deployment id is fresh, so the job needs no dedupe lookup.
                job = jobs.enqueue(
                    session,
                    DEPLOY_JOB_KIND,
                    _deploy_payload(dep_id, principal, request_id, spec, now),
                    now=now,
                )
                dep = cp.create_deployment(
                    session,
                    tenant_id=principal.tenant_id,
                    customer_id=principal.customer_id,
                    request_id=request_id,
                    spec=spec.model_dump(mode="json", exclude_none=True),
                    now=now,
                    deployment_id=dep_id,
                    job_id=job.id,
                )
                body = s.DeployResponse(
                    request_id=request_id,
                    deployment=s.DeploymentOut.of(dep),
                    events_url=f"/v1/deployments/{dep.id}/events",
                ).model_dump(mode="json")
                if idempotency_key:
                    cp.put_idempotency(
                        session,
                        principal.customer_id,
                        idempotency_key,
                        request_hash=digest,
                        status_code=202,
                        response=body,
                        now=now,
                    )
                return 202, body, False
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won; replay its answer.
            if not idempotency_key:
                raise
    raise Conflict("concurrent requests with the same Idempotency-Key", retryable=True)


def _stop_payload(deployment_id: str, principal: Principal, request_id: str) -> Json:
    return {
        "deployment_id": deployment_id,
        "request_id": request_id,
        "customer_id": principal.customer_id,
    }


def _live_stop_job(session: Session, deployment_id: str) -> bool:
    live = (jobs.JobState.QUEUED, jobs.JobState.RUNNING)
    return any(
        j.dedupe_key == deployment_id for j in jobs.list_jobs(session, STOP_JOB_KIND, states=live)
    )


def stop_deployment(
    factory: sessionmaker[Session],
    clock: Clock,
    principal: Principal,
    deployment_id: str,
    *,
    request_id: str,
    write_lock: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[int, Json]:
    """A user's stop, in one transaction (the decision is :func:`cp.stop_action`); returns
    (status, body): 202 while a stop job deletes the VMs (after interrupting a deploy at work:
    its job's ``cancel_requested`` is set in the same transaction as ``stopping``, which is what
    lets the deploy tell a stop from a failure), 200 once there is nothing left to do (cancelled
    now, or already stopped/cancelled). Another tenant's deployment is NotFound."""
    write_lock = write_lock or contextlib.nullcontext()
    with write_lock, db.transaction(factory) as session:
        dep = cp.get_deployment(
            session, deployment_id, tenant_id=principal.tenant_id, for_update=True
        )
        now = clock.time_ns() / 1e9
        deploy_job: jobs.Job | None = None
        if dep.job_id:
            with contextlib.suppress(NotFound):
                deploy_job = jobs.get(session, dep.job_id)
        live = deploy_job is not None and deploy_job.state not in jobs.FINISHED
        action = cp.stop_action(dep.id, dep.state, deploy_job_live=live)
        # a deploy job still queued (not picked up yet, or a failed deploy's retry) never runs
        if action != "none" and deploy_job is not None and deploy_job.state == jobs.JobState.QUEUED:
            jobs.cancel(session, deploy_job.id, now=now)
        if action == "cancel":
            cp.add_event(session, dep.id, "stop", "cancelled before a worker picked it up",
                         now=now, data={"request_id": request_id})  # fmt: skip
            dep = cp.record_state(session, dep.id, "cancelled", now=now)
        elif dep.state == "stopping" and not _live_stop_job(session, dep.id):
            # its stop job died without finishing it (a worker lost its lease on the last
            # attempt): nothing would move it any more, so this stop starts a new one
            job = jobs.enqueue(session, STOP_JOB_KIND, _stop_payload(dep.id, principal, request_id),
                               now=now, dedupe_key=dep.id)  # fmt: skip
            cp.add_event(session, dep.id, "stop", "stop requested again: the last stop job ended "
                         "without finishing", now=now,
                         data={"request_id": request_id, "job_id": job.id})  # fmt: skip
        elif action == "interrupt":
            # its deploy job is live: asked to cancel here (its worker stops at its next step
            # and deletes what it created); the stop job waits for it to end, then finishes
            if deploy_job is not None and deploy_job.state == jobs.JobState.RUNNING:
                jobs.cancel(session, deploy_job.id, now=now)
            job = jobs.enqueue(session, STOP_JOB_KIND, _stop_payload(dep.id, principal, request_id),
                               now=now, dedupe_key=dep.id)  # fmt: skip
            cp.add_event(session, dep.id, "stop", f"stop requested while {dep.state}: the deploy "
                         "is interrupted, then the deployment's VMs deleted", now=now,
                         data={"request_id": request_id, "job_id": job.id,
                               "deploy_job_id": dep.job_id})  # fmt: skip
            dep = cp.record_state(session, dep.id, "stopping", now=now)
        elif action == "stop":
            if dep.state in ("building", "deploying"):
                # its deploy job ended without finishing it: nothing moves it any more
                orphaned = UnkeyError(
                    f"the deploy job ended while the deployment was {dep.state}",
                    details={"job_id": dep.job_id},
                )
                dep = cp.record_state(session, dep.id, "failed", now=now, error=orphaned.to_dict())
            job = jobs.enqueue(session, STOP_JOB_KIND, _stop_payload(dep.id, principal, request_id),
                               now=now, dedupe_key=dep.id)  # fmt: skip
            cp.add_event(session, dep.id, "stop", "stop requested: deleting the deployment's VMs",
                         now=now, data={"request_id": request_id, "job_id": job.id})  # fmt: skip
            dep = cp.record_state(session, dep.id, "stopping", now=now)
    body = s.DeploymentResponse(request_id=request_id, deployment=s.DeploymentOut.of(dep))
    return (202 if dep.state == "stopping" else 200), body.model_dump(mode="json")


class HostsAccess:
    """metald's :class:`Scheduler` for the host routes, made at their first use (its asset
    manager, which releases a forgotten VM's lease, opens the blob store), like the deployer's:
    the gateway's database, ``open_assets(settings)``."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.factory = factory
        self._scheduler: Scheduler | None = None
        self._lock = threading.Lock()

    def scheduler(self) -> Scheduler:
        with self._lock:
            if self._scheduler is None:
                from ..assets.service import open_assets  # noqa: PLC0415 (opens the blob store)

                self._scheduler = Scheduler(
                    self.factory.kw["bind"],
                    lost_after_s=self.settings.metald.host_lost_after_s,
                    leases=open_assets(self.settings),
                )
            return self._scheduler


def _hosts(request: Request) -> Scheduler:
    access: HostsAccess = request.app.state.hosts
    return access.scheduler()


def _routes(router: APIRouter) -> None:
    @router.get("/healthz", response_model=s.Health, tags=["ops"])
    async def healthz(request: Request) -> Response:
        return _json({"status": "ok", "request_id": _request_id(request)})

    @router.post(
        "/v1/deploy",
        status_code=202,
        response_model=s.DeployResponse,
        responses=ERRORS,
        tags=["deployments"],
        summary="Deploy an app (the app.yaml as JSON)",
    )
    async def deploy(
        spec: appspec.AppSpec,
        request: Request,
        principal: Annotated[Principal, Depends(require_principal)],
        idempotency_key: Annotated[
            str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
        ] = None,
    ) -> Response:
        st = state_of(request)
        if spec.image.startswith(LOCAL_SOURCES) and not request.app.state.local_images:
            # (builderd would refuse it too, once the deployment is queued)
            raise InvalidInput(
                f"image: {spec.image[:200]!r} names files of the platform's own host "
                f"({', '.join(LOCAL_SOURCES)}), which this platform does not build from",
                suggestion="push the image to a registry and deploy its reference",
            )
        work = functools.partial(
            accept_deployment,
            st.factory,
            st.clock,
            principal,
            spec,
            request_id=_request_id(request),
            idempotency_key=idempotency_key,
            write_lock=st.write_lock,
        )
        # SQLite: one local writer at a time and a transaction well under a millisecond, so it
        # runs on the event loop (no thread hand-off, no GIL ping-pong). Other databases go
        # through the thread pool, since their round trips would stall the loop.
        if st.inline_writes:
            status, body, replayed = work()
        else:
            status, body, replayed = await run_in_threadpool(work)
        headers = {"Idempotent-Replayed": "true"} if replayed else None
        return _json(body, status, headers)

    @router.get(
        "/v1/deployments", response_model=s.DeploymentList, responses=ERRORS, tags=["deployments"]
    )
    def list_deployments(
        request: Request,
        principal: Annotated[Principal, Depends(require_principal)],
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        state: Annotated[str | None, Query(max_length=16)] = None,
    ) -> Response:
        st = state_of(request)
        if state is not None and state not in cp.DEPLOYMENT_STATES:
            # a typo would otherwise list nothing, as if no deployment were in that state
            known = ", ".join(cp.DEPLOYMENT_STATES)
            msg = f"{state!r} is not a state; use one of {known}"
            raise ValidationFailed("invalid request: query.state", [Problem("query.state", msg)])
        with st.factory() as session:
            deps = cp.list_deployments(
                session, tenant_id=principal.tenant_id, limit=limit, state=state
            )
        body = s.DeploymentList(
            request_id=_request_id(request), deployments=[s.DeploymentOut.of(d) for d in deps]
        )
        return _json(body.model_dump(mode="json"))

    @router.get(
        "/v1/deployments/{deployment_id}",
        response_model=s.DeploymentResponse,
        responses=ERRORS,
        tags=["deployments"],
    )
    def get_deployment(
        deployment_id: str,
        request: Request,
        principal: Annotated[Principal, Depends(require_principal)],
    ) -> Response:
        st = state_of(request)
        with st.factory() as session:
            dep = cp.get_deployment(session, deployment_id, tenant_id=principal.tenant_id)
        body = s.DeploymentResponse(
            request_id=_request_id(request), deployment=s.DeploymentOut.of(dep)
        )
        return _json(body.model_dump(mode="json"))

    @router.delete(
        "/v1/deployments/{deployment_id}",
        status_code=202,
        response_model=s.DeploymentResponse,
        responses={
            200: {
                "model": s.DeploymentResponse,
                "description": "nothing left to stop: cancelled now (it was accepted, no worker "
                "had started it), or already stopped or cancelled",
            },
            202: {
                "description": "stopping: a stop job deletes the deployment's VMs (a deploy in "
                "progress is interrupted first)"
            },
            **ERRORS,
        },
        tags=["deployments"],
        summary="Stop a deployment (delete its VMs)",
    )
    async def stop(
        deployment_id: str,
        request: Request,
        principal: Annotated[Principal, Depends(require_principal)],
    ) -> Response:
        """Tear a deployment down. ``accepted`` (not started yet) becomes ``cancelled`` at once
        (200); ``running`` or ``failed`` becomes ``stopping`` and a stop job deletes its VMs,
        then it is ``stopped`` (202; follow ``/events``). ``building``/``deploying`` becomes
        ``stopping`` too (202): the deploy is interrupted at its next step (its build
        cancelled, whatever VM it created deleted), then the stop job finishes. A stop attempt
        that fails and will be retried leaves it ``stopping``; ``failed`` means the stop has
        finally failed. Stopping again is harmless: the current deployment, no second job."""
        st = state_of(request)
        work = functools.partial(
            stop_deployment,
            st.factory,
            st.clock,
            principal,
            deployment_id,
            request_id=_request_id(request),
            write_lock=st.write_lock,
        )
        # like POST /v1/deploy: on SQLite on the loop, otherwise in the thread pool
        status, body = work() if st.inline_writes else await run_in_threadpool(work)
        return _json(body, status)

    @router.get(
        "/v1/deployments/{deployment_id}/events",
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "server-sent events"},
            **ERRORS,
        },
        response_class=StreamingResponse,
        tags=["deployments"],
        summary="Progress of a deployment as server-sent events",
    )
    async def deployment_events(
        deployment_id: str,
        request: Request,
        principal: Annotated[Principal, Depends(require_principal)],
        follow: bool = True,
        last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0)] = None,
    ) -> Response:
        """Each event: ``id`` (resume with ``Last-Event-ID``), ``event`` (the phase) and JSON
        ``data`` {id, phase, message, data, state, at}. The stream ends once the deployment is
        running, failed, stopped or cancelled (or at once with ``follow=false``)."""
        st = state_of(request)

        def snapshot(after: int) -> tuple[cp.Deployment, list[cp.DeploymentEvent]]:
            with st.factory() as session:
                dep = cp.get_deployment(session, deployment_id, tenant_id=principal.tenant_id)
                return dep, cp.events_after(session, deployment_id, after)

        first = await run_in_threadpool(snapshot, last_event_id or 0)

        async def stream() -> Any:
            dep, events = first
            after = last_event_id or 0
            idle = 0.0
            while True:
                for ev in events:
                    after = ev.id
                    data = {
                        "id": ev.id,
                        "phase": ev.phase,
                        "message": ev.message,
                        "data": ev.data,
                        "at": s.iso(ev.created_at),
                    }
                    yield f"id: {ev.id}\nevent: {ev.phase}\ndata: {json.dumps(data)}\n\n"
                if not events and (not follow or dep.state in cp.TERMINAL_STATES):
                    end = {"state": dep.state, "url": dep.url, "error": dep.error}
                    yield f"event: end\ndata: {json.dumps(end)}\n\n"
                    return
                if not events:
                    await asyncio.sleep(0.2)
                    idle += 0.2
                    if idle >= 15:
                        idle = 0.0
                        yield ": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                dep, events = await run_in_threadpool(snapshot, after)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get("/v1/whoami", response_model=s.WhoAmI, responses=ERRORS, tags=["keys"])
    async def whoami(
        request: Request, principal: Annotated[Principal, Depends(require_principal)]
    ) -> Response:
        return _json(
            {
                "request_id": _request_id(request),
                "customer_id": principal.customer_id,
                "tenant_id": principal.tenant_id,
                "key_id": principal.key_id,
                "method": principal.method,
            }
        )

    @router.post(
        "/v1/keys", status_code=201, response_model=s.KeyCreated, responses=ERRORS, tags=["keys"]
    )
    def create_key(
        body: s.CreateKeyRequest,
        request: Request,
        principal: Annotated[Principal, Depends(require_principal)],
    ) -> Response:
        """Create another API key for the caller's customer; the secret is shown only here."""
        st = state_of(request)
        with db.transaction(st.factory) as session:
            key, secret = cp.create_api_key(
                session, principal.customer_id, now=st.clock.time_ns() / 1e9, name=body.name
            )
        out = s.KeyCreated(request_id=_request_id(request), key=s.KeyOut.of(key), secret=secret)
        return _json(out.model_dump(mode="json"), 201)

    @router.get("/v1/keys", response_model=s.KeyList, responses=ERRORS, tags=["keys"])
    def list_keys(
        request: Request, principal: Annotated[Principal, Depends(require_principal)]
    ) -> Response:
        st = state_of(request)
        with st.factory() as session:
            keys = cp.list_api_keys(session, principal.customer_id)
        out = s.KeyList(request_id=_request_id(request), keys=[s.KeyOut.of(k) for k in keys])
        return _json(out.model_dump(mode="json"))

    @router.delete(
        "/v1/keys/{key_id}", response_model=s.KeyResponse, responses=ERRORS, tags=["keys"]
    )
    def revoke_key(
        key_id: str,
        request: Request,
        principal: Annotated[Principal, Depends(require_principal)],
    ) -> Response:
        st = state_of(request)
        with db.transaction(st.factory) as session:
            key = cp.revoke_api_key(
                session, key_id, customer_id=principal.customer_id, now=st.clock.time_ns() / 1e9
            )
        st.auth.forget_key(key_id)
        out = s.KeyResponse(request_id=_request_id(request), key=s.KeyOut.of(key))
        return _json(out.model_dump(mode="json"))

    admin = [Depends(require_admin)]

    @router.post(
        "/v1/customers",
        status_code=201,
        response_model=s.CustomerCreated,
        responses=ERRORS,
        dependencies=admin,
        tags=["admin"],
    )
    def create_customer(body: s.CreateCustomerRequest, request: Request) -> Response:
        st = state_of(request)
        now = st.clock.time_ns() / 1e9
        key = secret = None
        with db.transaction(st.factory) as session:
            c = cp.create_customer(
                session,
                body.name,
                now=now,
                tenant_id=body.tenant_id,
                email=body.email,
                pricing_tier=body.pricing_tier,
                discount_pct=body.discount_pct,
                credit_balance=body.credit_balance,
            )
            if body.create_key:
                key, secret = cp.create_api_key(session, c.id, now=now)
        out = s.CustomerCreated(
            request_id=_request_id(request),
            customer=s.CustomerOut.of(c),
            key=s.KeyOut.of(key) if key else None,
            secret=secret,
        )
        return _json(out.model_dump(mode="json"), 201)

    @router.get(
        "/v1/customers",
        response_model=s.CustomerList,
        responses=ERRORS,
        dependencies=admin,
        tags=["admin"],
    )
    def list_customers(
        request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> Response:
        st = state_of(request)
        with st.factory() as session:
            cs = cp.list_customers(session, limit=limit)
        out = s.CustomerList(
            request_id=_request_id(request), customers=[s.CustomerOut.of(c) for c in cs]
        )
        return _json(out.model_dump(mode="json"))

    @router.get(
        "/v1/customers/{customer_id}",
        response_model=s.CustomerResponse,
        responses=ERRORS,
        dependencies=admin,
        tags=["admin"],
    )
    def get_customer(customer_id: str, request: Request) -> Response:
        st = state_of(request)
        with st.factory() as session:
            c = cp.get_customer(session, customer_id)
        out = s.CustomerResponse(request_id=_request_id(request), customer=s.CustomerOut.of(c))
        return _json(out.model_dump(mode="json"))

    @router.patch(
        "/v1/customers/{customer_id}",
        response_model=s.CustomerResponse,
        responses=ERRORS,
        dependencies=admin,
        tags=["admin"],
    )
    def update_customer(
        customer_id: str, body: s.UpdateCustomerRequest, request: Request
    ) -> Response:
        st = state_of(request)
        with db.transaction(st.factory) as session:
            c = cp.update_customer(
                session,
                customer_id,
                now=st.clock.time_ns() / 1e9,
                pricing_tier=body.pricing_tier,
                discount_pct=body.discount_pct,
                credit_balance=body.credit_balance,
                add_credits=body.add_credits,
            )
        out = s.CustomerResponse(request_id=_request_id(request), customer=s.CustomerOut.of(c))
        return _json(out.model_dump(mode="json"))

    @router.get(
        "/v1/hosts",
        response_model=s.HostList,
        responses=ERRORS,
        dependencies=admin,
        tags=["admin"],
        summary="The metald hosts: capacity, use, heartbeat, VMs by state",
    )
    def list_hosts(request: Request) -> Response:
        hosts = _hosts(request).hosts()
        now = state_of(request).clock.time_ns() / 1e9
        out = s.HostList(
            request_id=_request_id(request), hosts=[s.HostOut.of(h, now) for h in hosts]
        )
        return _json(out.model_dump(mode="json"))

    @router.delete(
        "/v1/hosts/{host_id}",
        response_model=s.HostForgotten,
        responses=ERRORS,
        dependencies=admin,
        tags=["admin"],
        summary="Forget a lost host that is never coming back",
    )
    def forget_host(host_id: str, request: Request) -> Response:
        """Remove a host declared lost: its lost VMs' rows, their asset leases (the asset store
        may then collect those rootfs blobs), its address leases and the host. A live or late
        host, or a lost one whose lost VMs still wait for a replacement, is 409; an unknown (or
        already forgotten) host is 404. Should the host come back, it registers anew and frees
        what it still runs of the forgotten VMs."""
        forgotten = _hosts(request).forget_host(host_id)
        out = s.HostForgotten(
            request_id=_request_id(request), forgotten=s.ForgottenHost(**forgotten)
        )
        return _json(out.model_dump(mode="json"))


def create_app(
    settings: Settings,
    *,
    routers: Sequence[APIRouter] = (),
    factory: sessionmaker[Session] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    admin_token: str | None = None,
) -> FastAPI:
    """The gateway app. ``routers`` are mounted as they are and may use ``require_principal``."""
    config = settings.gateway
    if factory is None:
        factory = db.session_factory(db.make_engine(settings.resolved_database_url))
    app = FastAPI(
        title="unkey-deploy gateway",
        version="1",
        description="Deploy container images as microVMs. Every response carries `request_id` "
        "(also in the `X-Request-Id` header); errors are `{error: {code, message, ...}, "
        "request_id}`.",
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    sqlite = factory.kw["bind"].dialect.name == "sqlite"
    app.state.gateway = GatewayState(
        config=config,
        factory=factory,
        clock=clock,
        auth=Authenticator(config, factory, clock),
        limiter=TokenBuckets(config.rate_limit_per_s, config.rate_limit_burst, clock),
        admin_token=admin_token or config.admin_token,
        write_lock=threading.Lock() if sqlite else contextlib.nullcontext(),
        inline_writes=sqlite,
    )
    app.state.hosts = HostsAccess(settings, factory)
    app.state.local_images = settings.builder.local_sources  # (see the deploy route)
    registry = CollectorRegistry()
    app.state.metrics_registry = registry
    router = APIRouter()
    _routes(router)
    app.include_router(router)
    for extra in routers:
        app.include_router(extra)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # the billing aggregator runs inside gatewayd by default: its metrics show here too
        body = core_metrics.render(registry, core_metrics.BILLING)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    base_openapi = app.openapi

    def openapi_with_security() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base_openapi()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`uk_...`), a JWT, or on admin routes the "
                    "admin token",
                }
            }
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_with_security  # type: ignore[method-assign]
    _install_error_handlers(app)
    app.add_middleware(RequestContext, max_body=config.max_body_bytes, registry=registry)
    return app


def new_admin_token() -> str:
    return "ukadm_" + secrets.token_hex(24)


__all__ = [
    "DEPLOY_JOB_KIND",
    "STOP_JOB_KIND",
    "HostsAccess",
    "accept_deployment",
    "create_app",
    "error_response",
    "stop_deployment",
]
