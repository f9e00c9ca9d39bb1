"""Billing routes for gatewayd (the lead mounts ``router``: ``create_app(settings,
routers=[billing.http.router])``) and puts a :class:`~.queries.BillingQueries` on
``app.state.billing`` (see :func:`.service.start_in_process`).

Tenant scoping: customer routes take the customer from the authenticated principal only; the
operator routes (capacity planning, any customer's invoice) need the admin token.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..core.errors import InvalidInput, Unavailable
from ..gateway.auth import Principal, require_admin, require_principal
from .invoice import Invoice, check_month, to_html
from .queries import BillingQueries

router = APIRouter(tags=["billing"])

# at most 31 days in seconds has 7 digits; more digits are out of range, not a number to parse
_DURATION = re.compile(r"^([0-9]{1,8})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SINCE_S = 31 * 86400


def parse_since(value: str) -> float:
    """``90s``, ``15m``, ``6h``, ``7d`` -> seconds (at most 31 days)."""
    m = _DURATION.match(value.strip())
    if not m:
        raise InvalidInput(
            f"since {value!r:.40} is not a duration of at most 31d",
            suggestion="use e.g. 30m, 6h or 7d",
        )
    secs = int(m.group(1)) * _UNIT_S[m.group(2)]
    if not 0 < secs <= MAX_SINCE_S:
        raise InvalidInput(f"since {value!r} must be between 1s and 31d")
    return float(secs)


def _queries(request: Request) -> BillingQueries:
    q: BillingQueries | None = getattr(request.app.state, "billing", None)
    if q is None:
        raise Unavailable(
            "the billing service is not running on this gateway",
            suggestion="start the local stack with `unkey dev up`",
        )
    return q


def _rid(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


def _month(q: BillingQueries, month: str | None) -> str:
    if month is None:
        return q.current_month()
    check_month(month)
    return month


@router.get("/v1/usage")
async def usage(
    request: Request,
    principal: Principal = Depends(require_principal),  # noqa: B008
    vm: str | None = Query(None, description="only this VM"),
    since: str = Query("1h", description="window: 30m, 6h, 7d ..."),
) -> JSONResponse:
    """The caller's VMs now (last 5 minutes) and their usage per 5 minutes since ``since``."""
    q = _queries(request)
    secs = parse_since(since)
    body: dict[str, Any] = await run_in_threadpool(
        lambda: q.usage(principal.customer_id, vm_id=vm, since_s=secs)
    )
    body["request_id"] = _rid(request)
    return JSONResponse(body)


@router.get("/v1/usage/capacity", dependencies=[Depends(require_admin)])
async def capacity(request: Request, days: int = Query(7, ge=1, le=30)) -> JSONResponse:
    """Operator: platform-wide peak usage per hour (p95 CPU, peak memory, active VMs)."""
    q = _queries(request)
    hours = await run_in_threadpool(lambda: q.capacity(days=days))
    return JSONResponse({"hours": hours, "request_id": _rid(request)})


@router.get("/v1/bill")
async def bill(
    request: Request,
    principal: Principal = Depends(require_principal),  # noqa: B008
    month: str | None = Query(None, description="YYYY-MM (UTC); default this month"),
) -> JSONResponse:
    """The caller's invoice for a month: lines, subtotal, discount, credits, total."""
    q = _queries(request)
    m = _month(q, month)
    inv = await run_in_threadpool(lambda: q.invoice(principal.customer_id, m))
    return JSONResponse({"invoice": inv.to_json(), "request_id": _rid(request)})


@router.get("/v1/invoices/{month}.html", response_class=HTMLResponse)
async def invoice_html(
    request: Request,
    month: str,
    principal: Principal = Depends(require_principal),  # noqa: B008
) -> HTMLResponse:
    """The caller's invoice as a printable HTML document."""
    q = _queries(request)
    check_month(month)
    inv = await run_in_threadpool(lambda: q.invoice(principal.customer_id, month))
    return HTMLResponse(to_html(inv))


@router.get("/v1/customers/{customer_id}/bill", dependencies=[Depends(require_admin)])
async def customer_bill(
    request: Request,
    customer_id: str,
    month: str | None = Query(None, description="YYYY-MM (UTC); default this month"),
    html: bool = Query(False, description="the HTML document instead of JSON"),
) -> Any:
    """Operator: any customer's invoice."""
    q = _queries(request)
    m = _month(q, month)
    inv = await run_in_threadpool(lambda: q.invoice(customer_id, m))
    if html:
        return HTMLResponse(to_html(inv))
    return JSONResponse({"invoice": inv.to_json(), "request_id": _rid(request)})


def _summary(inv: Invoice) -> dict[str, Any]:
    return {
        "number": inv.number,
        "month": inv.month,
        "issued_at": inv.issued_at,
        "subtotal": str(inv.subtotal),
        "credits_applied": str(inv.credits_applied),
        "total": str(inv.total),
        "currency": inv.currency,
    }


@router.get("/v1/invoices")
async def invoices(
    request: Request,
    principal: Principal = Depends(require_principal),  # noqa: B008
) -> JSONResponse:
    """The caller's issued invoices (number, month, totals), oldest first. An issued invoice
    never changes; ``GET /v1/bill?month=`` returns its whole document."""
    q = _queries(request)
    done = await run_in_threadpool(lambda: q.issued_invoices(principal.customer_id))
    return JSONResponse({"invoices": [_summary(i) for i in done], "request_id": _rid(request)})


@router.get("/v1/customers/{customer_id}/invoices", dependencies=[Depends(require_admin)])
async def customer_invoices(request: Request, customer_id: str) -> JSONResponse:
    """Operator: a customer's issued invoices."""
    q = _queries(request)
    done = await run_in_threadpool(lambda: q.issued_invoices(customer_id))
    return JSONResponse({"invoices": [_summary(i) for i in done], "request_id": _rid(request)})


@router.post(
    "/v1/customers/{customer_id}/invoices/{month}/finalize",
    dependencies=[Depends(require_admin)],
    status_code=201,
    responses={200: {"description": "the month was already issued: that invoice, unchanged"}},
)
async def finalize_invoice(request: Request, customer_id: str, month: str) -> JSONResponse:
    """Operator: issue a customer-month invoice once the month is over. It gets a number, its
    lines and totals are frozen and its credits are taken from the balance, exactly once;
    usage of the month that arrives later is billed as adjustment lines on the next invoice.
    Idempotent: issuing an issued month returns it with 200."""
    q = _queries(request)
    check_month(month)
    inv, issued_now = await run_in_threadpool(lambda: q.issue(customer_id, month))
    return JSONResponse(
        {"invoice": inv.to_json(), "issued_now": issued_now, "request_id": _rid(request)},
        status_code=201 if issued_now else 200,
    )
