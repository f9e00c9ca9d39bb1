"""Response and request bodies of the gateway API (the OpenAPI spec is generated from these)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..store import controlplane as cp


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _no_nul(v: str) -> str:
    if "\0" in v:
        raise ValueError("must not contain NUL characters")
    return v


Text = Annotated[str, AfterValidator(_no_nul)]
"""A string of a request body: stored as text, which on PostgreSQL cannot hold a NUL."""


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorProblem(_Out):
    loc: str
    msg: str
    line: int | None = None
    column: int | None = None


class ErrorDetail(_Out):
    code: str
    message: str
    retryable: bool
    suggestion: str | None = None
    details: dict[str, Any] | None = None
    problems: list[ErrorProblem] | None = None
    retry_after: float | None = None


class ErrorResponse(_Out):
    error: ErrorDetail
    request_id: str


class DeploymentOut(_Out):
    id: str
    tenant_id: str
    customer_id: str
    request_id: str
    name: str
    image: str
    state: str
    url: str | None
    asset_id: str | None
    error: dict[str, Any] | None
    job_id: str | None
    spec: dict[str, Any]
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, d: cp.Deployment) -> DeploymentOut:
        return cls(
            id=d.id,
            tenant_id=d.tenant_id,
            customer_id=d.customer_id,
            request_id=d.request_id,
            name=d.name,
            image=d.image,
            state=d.state,
            url=d.url,
            asset_id=d.asset_id,
            error=d.error,
            job_id=d.job_id,
            spec=d.spec,
            created_at=iso(d.created_at) or "",
            updated_at=iso(d.updated_at) or "",
        )


class DeployResponse(_Out):
    request_id: str
    deployment: DeploymentOut
    events_url: str


class DeploymentResponse(_Out):
    request_id: str
    deployment: DeploymentOut


class DeploymentList(_Out):
    request_id: str
    deployments: list[DeploymentOut]


class KeyOut(_Out):
    id: str
    customer_id: str
    tenant_id: str
    name: str
    hint: str
    created_at: str
    revoked_at: str | None

    @classmethod
    def of(cls, k: cp.ApiKey) -> KeyOut:
        return cls(
            id=k.id,
            customer_id=k.customer_id,
            tenant_id=k.tenant_id,
            name=k.name,
            hint=k.hint,
            created_at=iso(k.created_at) or "",
            revoked_at=iso(k.revoked_at),
        )


class CreateKeyRequest(_Out):
    name: Text = Field("default", min_length=1, max_length=200)


class KeyCreated(_Out):
    request_id: str
    key: KeyOut
    secret: str = Field(description="the API key; shown only in this response")


class KeyResponse(_Out):
    request_id: str
    key: KeyOut


class KeyList(_Out):
    request_id: str
    keys: list[KeyOut]


class CustomerOut(_Out):
    id: str
    tenant_id: str
    name: str
    email: str | None
    pricing_tier: str
    discount_pct: Decimal
    credit_balance: Decimal
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, c: cp.Customer) -> CustomerOut:
        return cls(
            id=c.id,
            tenant_id=c.tenant_id,
            name=c.name,
            email=c.email,
            pricing_tier=c.pricing_tier,
            discount_pct=c.discount_pct,
            credit_balance=c.credit_balance,
            created_at=iso(c.created_at) or "",
            updated_at=iso(c.updated_at) or "",
        )


class CreateCustomerRequest(_Out):
    name: Text = Field(min_length=1, max_length=200)
    email: Text | None = Field(None, max_length=320)
    tenant_id: Text | None = Field(
        None, description="default: a new tenant named after the customer"
    )
    pricing_tier: Text = "standard"
    discount_pct: Decimal = Field(Decimal(0), ge=0, le=100, decimal_places=2)
    credit_balance: Decimal = Field(Decimal(0), decimal_places=6)
    create_key: bool = Field(True, description="also create a first API key")


class UpdateCustomerRequest(_Out):
    pricing_tier: Text | None = None
    discount_pct: Decimal | None = Field(None, ge=0, le=100, decimal_places=2)
    credit_balance: Decimal | None = Field(None, decimal_places=6)
    add_credits: Decimal | None = Field(None, decimal_places=6)


class CustomerCreated(_Out):
    request_id: str
    customer: CustomerOut
    key: KeyOut | None = None
    secret: str | None = Field(None, description="the first API key; shown only here")


class CustomerResponse(_Out):
    request_id: str
    customer: CustomerOut


class CustomerList(_Out):
    request_id: str
    customers: list[CustomerOut]


class HostOut(_Out):
    """A metald host as the scheduler sees it."""

    host_id: str
    name: str
    driver: str
    cpus: int
    memory_bytes: int
    used_cpus: int
    used_memory_bytes: int
    schedulable: bool = Field(description="live (fresh heartbeat, not lost) and taking VMs")
    heartbeat_at: str
    heartbeat_age_s: float = Field(description="seconds since its last heartbeat")
    lost_at: str | None = Field(description="when it was declared lost (null: not lost)")
    vms: dict[str, int] = Field(description="the VMs recorded on it, by state")

    @classmethod
    def of(cls, h: dict[str, Any], now: float) -> HostOut:
        return cls(
            host_id=h["host_id"],
            name=h["name"],
            driver=h["driver"],
            cpus=h["cpus"],
            memory_bytes=h["memory_bytes"],
            used_cpus=h["used_cpus"],
            used_memory_bytes=h["used_memory_bytes"],
            schedulable=h["schedulable"],
            heartbeat_at=iso(h["heartbeat_at"]) or "",
            heartbeat_age_s=round(max(0.0, now - h["heartbeat_at"]), 1),
            lost_at=iso(h["lost_at"]),
            vms=dict(h["vms"]),
        )


class HostList(_Out):
    request_id: str
    hosts: list[HostOut]


class ForgottenHost(_Out):
    host_id: str
    name: str
    vms: list[str] = Field(description="the lost VMs whose rows were removed")
    asset_leases_released: int
    ip_leases_released: int


class HostForgotten(_Out):
    request_id: str
    forgotten: ForgottenHost


class WhoAmI(_Out):
    request_id: str
    customer_id: str
    tenant_id: str
    key_id: str
    method: str


class Health(_Out):
    status: str
    request_id: str
