"""``GET /v1/deployments/{id}/logs``: the serial console (or sandbox output) of a deployment's VMs.

Tenant-scoped like every deployment route: another tenant's deployment is 404, the same as one
that does not exist. The build log is not here: it is the deployment's event stream
(``/v1/deployments/{id}/events``); ``unkey logs`` shows both.

The consoles come from metald's interface (:func:`unkey_deploy.metald.api.read_consoles`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ..metald.api import Console, read_consoles
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

    def load() -> list[Console]:
        with st.factory() as session:
            cp.get_deployment(session, deployment_id, tenant_id=principal.tenant_id)
            return read_consoles(session, deployment_id, vm_id=vm, offset=offset, tail=tail)

    consoles = await run_in_threadpool(load)
    out = [
        VmLog(
            vm_id=c.vm_id,
            state=c.state,
            instance_id=c.instance_id,
            console=c.data.decode("utf-8", errors="replace"),
            offset=c.offset,
            size=c.size,
            truncated=c.truncated,
        )
        for c in consoles
    ]
    body = DeploymentLogs(
        request_id=str(getattr(request.state, "request_id", "")),
        deployment_id=deployment_id,
        vms=out,
    )
    return JSONResponse(body.model_dump(mode="json"))
