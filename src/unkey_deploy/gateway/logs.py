"""``GET /v1/deployments/{id}/logs``: the serial console (or sandbox output) of a deployment's VMs.

Tenant-scoped like every deployment route: another tenant's deployment is 404, the same as one
that does not exist. The build log is not here: it is the deployment's event stream
(``/v1/deployments/{id}/events``); ``unkey logs`` shows both.

The console file is written by the VMM on the VM's host (metald records its path in the VM's
runtime). gatewayd reads it directly, which works where gatewayd shares the host's filesystem
(the local stack); a multi-host cluster needs metald to serve it (see the report of issue 7).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ..metald import models as metald_models
from ..store import controlplane as cp
from .app import ERRORS
from .auth import Principal, require_principal, state_of

router = APIRouter(tags=["deployments"])

DEFAULT_TAIL = 64 * 1024
MAX_TAIL = 1024 * 1024


class VmLog(BaseModel):
    vm_id: str
    state: str
    instance_id: str | None
    # the last ``size - offset`` bytes of the console, decoded as UTF-8 (invalid bytes replaced)
    console: str
    # where this text starts in the console file and how big the file is: poll again with
    # ``offset=size`` to get only what was written since (``unkey logs --follow``)
    offset: int
    size: int
    truncated: bool


class DeploymentLogs(BaseModel):
    request_id: str
    deployment_id: str
    vms: list[VmLog]


def _read(path: str | None, offset: int | None, tail: int) -> tuple[bytes, int, int, bool]:
    """(bytes, start, size, truncated) of the console file: from ``offset`` (default 0), but at
    most its last ``tail`` bytes (``truncated``: some bytes after ``offset`` were skipped). A
    missing file is empty (the VM has not booted yet)."""
    if not path:
        return b"", 0, 0, False
    want = offset or 0
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if want > size:  # a new file (the VM restarted): from its beginning
                want = 0
            start = max(min(want, size), size - tail)
            fh.seek(start)
            return fh.read(size - start), start, size, start > want
    except FileNotFoundError:
        return b"", 0, 0, False


@router.get(
    "/v1/deployments/{deployment_id}/logs",
    response_model=DeploymentLogs,
    responses=ERRORS,
    summary="The console output of a deployment's VMs",
)
async def deployment_logs(
    *,
    deployment_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require_principal)],
    tail: Annotated[int, Query(ge=1, le=MAX_TAIL, description="at most this many bytes")] = (
        DEFAULT_TAIL
    ),
    offset: Annotated[int | None, Query(ge=0, description="only bytes from here on")] = None,
    vm: Annotated[str | None, Query(description="only this VM of the deployment")] = None,
) -> JSONResponse:
    st = state_of(request)
    vms = metald_models.vms

    def load() -> list[Any]:
        with st.factory() as session:
            cp.get_deployment(session, deployment_id, tenant_id=principal.tenant_id)
            q = (
                sa.select(vms.c.vm_id, vms.c.state, vms.c.instance_id, vms.c.runtime)
                .where(vms.c.deployment_id == deployment_id)
                .order_by(vms.c.created_at)
            )
            if vm is not None:
                q = q.where(vms.c.vm_id == vm)
            return list(session.execute(q))

    rows = await run_in_threadpool(load)
    out = []
    for r in rows:
        runtime = r.runtime if isinstance(r.runtime, dict) else {}
        path = runtime.get("log_path")
        data, start, size, truncated = await run_in_threadpool(
            _read, path if isinstance(path, str) else None, offset, tail
        )
        out.append(
            VmLog(
                vm_id=r.vm_id,
                state=r.state,
                instance_id=r.instance_id,
                console=data.decode("utf-8", errors="replace"),
                offset=start,
                size=size,
                truncated=truncated,
            )
        )
    body = DeploymentLogs(
        request_id=str(getattr(request.state, "request_id", "")),
        deployment_id=deployment_id,
        vms=out,
    )
    return JSONResponse(body.model_dump(mode="json"))
