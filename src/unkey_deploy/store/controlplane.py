"""Control-plane records: tenants, customers, API keys, deployments, their events, idempotency.

Every function takes a :class:`~sqlalchemy.orm.Session` (the caller owns the transaction) and
returns frozen snapshots, never ORM rows. Times are epoch seconds (``float``) from an injected
clock, like :mod:`.jobs`. Money columns (``discount_pct``, ``credit_balance``) are ``Decimal``.

Deployment lifecycle (a named :class:`IllegalTransition` for every other move)::

    accepted -> building -> deploying -> running -> stopping -> stopped
        \\           \\            \\          \\           \\
         `-----------`------------`----------`-----------`--> failed --(retry)--> building
    accepted -> cancelled                                       failed --(stop)--> stopping
                building/deploying --(stop: the deploy is interrupted)--> stopping

A user's stop (:func:`stop_action`, ``DELETE /v1/deployments/{id}``) cancels an ``accepted``
deployment at once, moves a ``running`` or ``failed`` one to ``stopping`` (a ``stop`` job then
deletes its VMs), and interrupts a ``building`` or ``deploying`` one: ``stopping`` at once, its
deploy job asked to cancel (its worker stops at its next step and deletes what it created, its
build included), and a ``stop`` job that first waits for that deploy job to end. Nothing moves
a deployment out of ``stopping`` but its stop job: to ``stopped``, or ``failed`` once the stop
job has finally failed (a failed attempt that will be retried leaves it ``stopping``).

The ``deployment_events`` table is append-only: any service adds progress with
:func:`add_event` (or :class:`DeploymentRecords`), and the gateway streams it as server-sent
events.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, cast

from sqlalchemy import (
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from ..core.clock import SYSTEM_CLOCK, Clock
from ..core.errors import Conflict, IllegalTransition, InvalidInput, NotFound
from ..core.ids import (
    CustomerId,
    DeploymentId,
    KeyId,
    TenantId,
    new_customer_id,
    new_deployment_id,
    new_key_id,
    new_tenant_id,
)
from .db import Base

PRICING_TIERS = ("free", "standard", "pro", "enterprise")
DEPLOYMENT_STATES = (
    "accepted",
    "building",
    "deploying",
    "running",
    "stopping",
    "stopped",
    "failed",
    "cancelled",
)
TERMINAL_STATES = frozenset({"running", "stopped", "failed", "cancelled"})
"""States after which a deployment's event stream ends (``running`` can move on, but the deploy
itself is done)."""

_TRANSITIONS: dict[str, frozenset[str]] = {
    "accepted": frozenset({"building", "failed", "cancelled"}),
    "building": frozenset({"building", "deploying", "failed", "stopping"}),
    "deploying": frozenset({"deploying", "running", "failed", "stopping"}),
    "running": frozenset({"stopping", "deploying", "failed"}),
    "stopping": frozenset({"stopped", "failed"}),
    "stopped": frozenset(),
    "failed": frozenset({"building", "stopping"}),
    "cancelled": frozenset(),
}

_CENT = Decimal("0.01")  # discount_pct is Numeric(5, 2)
_MICRO = Decimal("0.000001")  # credit_balance is Numeric(18, 6)

API_KEY_PREFIX = "uk_"
_API_KEY_RE = re.compile(r"^uk_([0-9A-HJKMNP-TV-Z]{26})_([0-9a-f]{48})$")


# --- tables ---------------------------------------------------------------------------------------


class TenantRow(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[float]


class CustomerRow(Base):
    __tablename__ = "customers"
    __table_args__ = (Index("ix_customers_tenant", "tenant_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    pricing_tier: Mapped[str] = mapped_column(String(32), default="standard")
    discount_pct: Mapped[Decimal] = mapped_column(Numeric(5, 2), default=Decimal(0))
    credit_balance: Mapped[Decimal] = mapped_column(Numeric(18, 6), default=Decimal(0))
    created_at: Mapped[float]
    updated_at: Mapped[float]


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_customer", "customer_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(40), ForeignKey("customers.id"))
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[str] = mapped_column(String(64))
    hint: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float]
    revoked_at: Mapped[float | None] = mapped_column(nullable=True)


class DeploymentRow(Base):
    __tablename__ = "deployments"
    __table_args__ = (Index("ix_deployments_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"))
    customer_id: Mapped[str] = mapped_column(String(40), ForeignKey("customers.id"))
    request_id: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(63))
    image: Mapped[str] = mapped_column(String(1024))
    spec: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    url: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    asset_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[float]
    updated_at: Mapped[float]


class DeploymentEventRow(Base):
    __tablename__ = "deployment_events"
    __table_args__ = (Index("ix_deployment_events_dep", "deployment_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(String(40), ForeignKey("deployments.id"))
    phase: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float]


class IdempotencyRow(Base):
    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("customer_id", "key", name="uq_idempotency_customer_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int]
    response: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float]


_DEPLOYMENTS = cast(Table, DeploymentRow.__table__)
_EVENTS = cast(Table, DeploymentEventRow.__table__)
_INSERT_EVENT = insert(_EVENTS)


# --- snapshots ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    id: TenantId
    name: str
    created_at: float


@dataclass(frozen=True)
class Customer:
    id: CustomerId
    tenant_id: TenantId
    name: str
    email: str | None
    pricing_tier: str
    discount_pct: Decimal
    credit_balance: Decimal
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, r: CustomerRow) -> Customer:
        return cls(
            id=CustomerId(r.id),
            tenant_id=TenantId(r.tenant_id),
            name=r.name,
            email=r.email,
            pricing_tier=r.pricing_tier,
            discount_pct=Decimal(r.discount_pct).quantize(_CENT),
            credit_balance=Decimal(r.credit_balance).quantize(_MICRO),
            created_at=r.created_at,
            updated_at=r.updated_at,
        )


@dataclass(frozen=True)
class ApiKey:
    id: KeyId
    customer_id: CustomerId
    tenant_id: TenantId
    name: str
    secret_hash: str
    hint: str
    created_at: float
    revoked_at: float | None

    @classmethod
    def of(cls, r: ApiKeyRow) -> ApiKey:
        return cls(
            id=KeyId(r.id),
            customer_id=CustomerId(r.customer_id),
            tenant_id=TenantId(r.tenant_id),
            name=r.name,
            secret_hash=r.secret_hash,
            hint=r.hint,
            created_at=r.created_at,
            revoked_at=r.revoked_at,
        )

    def matches(self, secret: str) -> bool:
        """Constant-time check of ``secret`` against the stored hash."""
        return hmac.compare_digest(hash_secret(secret), self.secret_hash)


@dataclass(frozen=True)
class Deployment:
    id: DeploymentId
    tenant_id: TenantId
    customer_id: CustomerId
    request_id: str
    name: str
    image: str
    spec: dict[str, Any]
    state: str
    url: str | None
    asset_id: str | None
    error: dict[str, Any] | None
    job_id: str | None
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, r: DeploymentRow) -> Deployment:
        return cls(
            id=DeploymentId(r.id),
            tenant_id=TenantId(r.tenant_id),
            customer_id=CustomerId(r.customer_id),
            request_id=r.request_id,
            name=r.name,
            image=r.image,
            spec=json.loads(r.spec),
            state=r.state,
            url=r.url,
            asset_id=r.asset_id,
            error=json.loads(r.error) if r.error else None,
            job_id=r.job_id,
            created_at=r.created_at,
            updated_at=r.updated_at,
        )


@dataclass(frozen=True)
class DeploymentEvent:
    id: int
    deployment_id: DeploymentId
    phase: str
    message: str
    data: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class IdempotencyRecord:
    customer_id: str
    key: str
    request_hash: str
    status_code: int
    response: dict[str, Any]
    created_at: float


# --- tenants and customers ------------------------------------------------------------------------


def get_or_create_tenant(session: Session, name: str, *, now: float) -> Tenant:
    row = session.scalars(select(TenantRow).where(TenantRow.name == name)).first()
    if row is None:
        row = TenantRow(id=new_tenant_id(), name=name, created_at=now)
        session.add(row)
        session.flush()
    return Tenant(id=TenantId(row.id), name=row.name, created_at=row.created_at)


def get_tenant(session: Session, tenant_id: str) -> Tenant:
    row = session.get(TenantRow, tenant_id)
    if row is None:
        raise NotFound(f"tenant {tenant_id} not found")
    return Tenant(id=TenantId(row.id), name=row.name, created_at=row.created_at)


def _check_money(pricing_tier: str | None, discount_pct: Decimal | None) -> None:
    if pricing_tier is not None and pricing_tier not in PRICING_TIERS:
        raise InvalidInput(
            f"unknown pricing tier {pricing_tier!r}",
            suggestion=f"use one of {', '.join(PRICING_TIERS)}",
        )
    if discount_pct is not None and not Decimal(0) <= discount_pct <= Decimal(100):
        raise InvalidInput(f"discount_pct {discount_pct} must be between 0 and 100")
    if discount_pct is not None and discount_pct != discount_pct.quantize(_CENT):
        raise InvalidInput(f"discount_pct {discount_pct} has more than 2 decimal places")


def _check_credits(value: Decimal | None, what: str) -> None:
    if value is None:
        return
    # Range first: quantize() of a huge value raises decimal.InvalidOperation.
    if value.is_finite() and abs(value) >= Decimal(10) ** 12:
        raise InvalidInput(f"{what} {value} is out of range")
    if not value.is_finite() or value != value.quantize(_MICRO):
        raise InvalidInput(f"{what} {value} must be a finite amount with at most 6 decimal places")


def create_customer(
    session: Session,
    name: str,
    *,
    now: float,
    tenant_id: str | None = None,
    email: str | None = None,
    pricing_tier: str = "standard",
    discount_pct: Decimal = Decimal(0),
    credit_balance: Decimal = Decimal(0),
) -> Customer:
    """Create a customer; without ``tenant_id`` the customer gets a tenant of its own name."""
    if not name or len(name) > 200:
        raise InvalidInput("customer name must be 1..200 characters")
    _check_money(pricing_tier, discount_pct)
    _check_credits(credit_balance, "credit_balance")
    if tenant_id is None:
        if session.scalars(select(TenantRow.id).where(TenantRow.name == name)).first():
            raise Conflict(
                f"a tenant named {name!r} already exists",
                suggestion="pass its tenant_id to add the customer to it, or choose another name",
            )
        tenant_id = get_or_create_tenant(session, name, now=now).id
    else:
        get_tenant(session, tenant_id)
    row = CustomerRow(
        id=new_customer_id(),
        tenant_id=tenant_id,
        name=name,
        email=email,
        pricing_tier=pricing_tier,
        discount_pct=discount_pct,
        credit_balance=credit_balance,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return Customer.of(row)


def get_customer(session: Session, customer_id: str) -> Customer:
    row = session.get(CustomerRow, customer_id)
    if row is None:
        raise NotFound(f"customer {customer_id} not found")
    return Customer.of(row)


def list_customers(session: Session, *, limit: int = 100) -> list[Customer]:
    rows = session.scalars(select(CustomerRow).order_by(CustomerRow.created_at).limit(limit))
    return [Customer.of(r) for r in rows]


def update_customer(
    session: Session,
    customer_id: str,
    *,
    now: float,
    pricing_tier: str | None = None,
    discount_pct: Decimal | None = None,
    credit_balance: Decimal | None = None,
    add_credits: Decimal | None = None,
) -> Customer:
    """Change a customer's tier, discount or credits (set with ``credit_balance``, or add)."""
    _check_money(pricing_tier, discount_pct)
    _check_credits(credit_balance, "credit_balance")
    _check_credits(add_credits, "add_credits")
    row = session.get(CustomerRow, customer_id, with_for_update=True)
    if row is None:
        raise NotFound(f"customer {customer_id} not found")
    if pricing_tier is not None:
        row.pricing_tier = pricing_tier
    if discount_pct is not None:
        row.discount_pct = discount_pct
    if credit_balance is not None:
        row.credit_balance = credit_balance
    if add_credits is not None:
        total = Decimal(row.credit_balance) + add_credits
        _check_credits(total, "credit_balance after add_credits")  # Numeric(18, 6) must hold it
        row.credit_balance = total
    row.updated_at = now
    session.flush()
    return Customer.of(row)


# --- API keys -------------------------------------------------------------------------------------


def hash_secret(secret: str) -> str:
    """SHA-256 of the key's secret. The secret is 192 random bits, so a slow KDF adds nothing."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_api_key(token: str) -> tuple[KeyId, str] | None:
    """``uk_<26 chars>_<48 hex>`` -> (``key_<26 chars>``, secret), or None if malformed."""
    m = _API_KEY_RE.match(token)
    if not m:
        return None
    return KeyId("key_" + m.group(1)), m.group(2)


def create_api_key(
    session: Session, customer_id: str, *, now: float, name: str = "default"
) -> tuple[ApiKey, str]:
    """Create a key; returns the record and the plaintext key, which is never stored."""
    customer = get_customer(session, customer_id)
    key_id = new_key_id()
    secret = secrets.token_hex(24)
    plaintext = f"{API_KEY_PREFIX}{key_id[len('key_') :]}_{secret}"
    row = ApiKeyRow(
        id=key_id,
        customer_id=customer.id,
        tenant_id=customer.tenant_id,
        name=name[:200] or "default",
        secret_hash=hash_secret(secret),
        hint=plaintext[:7] + "…" + secret[-4:],
        created_at=now,
        revoked_at=None,
    )
    session.add(row)
    session.flush()
    return ApiKey.of(row), plaintext


def find_api_key(session: Session, key_id: str) -> ApiKey | None:
    row = session.get(ApiKeyRow, key_id)
    return None if row is None else ApiKey.of(row)


def list_api_keys(session: Session, customer_id: str) -> list[ApiKey]:
    rows = session.scalars(
        select(ApiKeyRow).where(ApiKeyRow.customer_id == customer_id).order_by(ApiKeyRow.id)
    )
    return [ApiKey.of(r) for r in rows]


def revoke_api_key(session: Session, key_id: str, *, customer_id: str, now: float) -> ApiKey:
    """Revoke a key of ``customer_id``; another customer's key is NotFound (never Forbidden)."""
    row = session.get(ApiKeyRow, key_id)
    if row is None or row.customer_id != customer_id:
        raise NotFound(f"API key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = now
        session.flush()
    return ApiKey.of(row)


# --- deployments ----------------------------------------------------------------------------------


def create_deployment(
    session: Session,
    *,
    tenant_id: str,
    customer_id: str,
    request_id: str,
    spec: dict[str, Any],
    now: float,
    deployment_id: str | None = None,
    job_id: str | None = None,
) -> Deployment:
    """Record an accepted deployment (state ``accepted``) and its first event.

    Core inserts rather than the ORM unit of work: this is the gateway's hot path.
    """
    values: dict[str, Any] = {
        "id": deployment_id or new_deployment_id(),
        "tenant_id": tenant_id,
        "customer_id": customer_id,
        "request_id": request_id,
        "name": str(spec["name"]),
        "image": str(spec["image"]),
        "spec": json.dumps(spec, sort_keys=True),
        "state": "accepted",
        "url": None,
        "asset_id": None,
        "error": None,
        "job_id": job_id,
        "created_at": now,
        "updated_at": now,
    }
    session.connection().execute(insert(_DEPLOYMENTS), [values])
    add_event(session, values["id"], "accepted", "deployment accepted", now=now)
    return Deployment(
        id=DeploymentId(values["id"]),
        tenant_id=TenantId(tenant_id),
        customer_id=CustomerId(customer_id),
        request_id=request_id,
        name=values["name"],
        image=values["image"],
        spec=spec,
        state="accepted",
        url=None,
        asset_id=None,
        error=None,
        job_id=job_id,
        created_at=now,
        updated_at=now,
    )


def attach_job(session: Session, deployment_id: str, job_id: str) -> None:
    row = session.get(DeploymentRow, deployment_id)
    if row is None:
        raise NotFound(f"deployment {deployment_id} not found")
    row.job_id = job_id
    session.flush()


def get_deployment(
    session: Session, deployment_id: str, *, tenant_id: str | None, for_update: bool = False
) -> Deployment:
    """The deployment, if it belongs to ``tenant_id`` (None: any tenant, for internal services).

    Another tenant's deployment is NotFound, indistinguishable from one that does not exist.
    ``for_update`` locks the row (PostgreSQL) for a decision taken on its state.
    """
    row = session.get(DeploymentRow, deployment_id, with_for_update=for_update)
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"deployment {deployment_id} not found")
    return Deployment.of(row)


def list_deployments(
    session: Session, *, tenant_id: str, limit: int = 50, state: str | None = None
) -> list[Deployment]:
    q = select(DeploymentRow).where(DeploymentRow.tenant_id == tenant_id)
    if state is not None:
        q = q.where(DeploymentRow.state == state)
    q = q.order_by(DeploymentRow.created_at.desc(), DeploymentRow.id.desc()).limit(limit)
    return [Deployment.of(r) for r in session.scalars(q)]


def set_state(
    session: Session,
    deployment_id: str,
    state: str,
    *,
    now: float,
    url: str | None = None,
    asset_id: str | None = None,
    error: dict[str, Any] | None = None,
    only_from: Collection[str] | None = None,
) -> Deployment:
    """Move a deployment to ``state``; raises IllegalTransition for a move the lifecycle forbids,
    or (with ``only_from``) from a state the caller does not expect: a deploy records its own
    failure only while it is still building or deploying, never over a user's stop."""
    if state not in _TRANSITIONS:
        raise InvalidInput(f"unknown deployment state {state!r}")
    row = session.get(DeploymentRow, deployment_id, with_for_update=True)
    if row is None:
        raise NotFound(f"deployment {deployment_id} not found")
    if only_from is not None and row.state not in only_from:
        raise IllegalTransition(
            f"deployment {deployment_id} is {row.state} (not {' or '.join(sorted(only_from))}):"
            f" {state} not recorded"
        )
    if state not in _TRANSITIONS[row.state]:
        raise IllegalTransition(f"deployment {deployment_id} cannot go from {row.state} to {state}")
    row.state = state
    if url is not None:
        row.url = url
    if asset_id is not None:
        row.asset_id = asset_id
    if error is not None:
        row.error = json.dumps(error, sort_keys=True)
    row.updated_at = now
    session.flush()
    return Deployment.of(row)


def record_state(
    session: Session,
    deployment_id: str,
    state: str,
    *,
    now: float,
    url: str | None = None,
    asset_id: str | None = None,
    error: dict[str, Any] | None = None,
    only_from: Collection[str] | None = None,
) -> Deployment:
    """:func:`set_state` plus its ``state`` event (phase ``state``, ``data.state``), which every
    move of a deployment appends so its event stream (and ``unkey logs``) shows the lifecycle."""
    dep = set_state(session, deployment_id, state, now=now, url=url, asset_id=asset_id,
                    error=error, only_from=only_from)  # fmt: skip
    add_event(session, deployment_id, "state", f"state: {state}", now=now, data={"state": state})
    return dep


StopAction = Literal["cancel", "interrupt", "stop", "none"]
"""What a user's stop does: ``cancel`` (nothing started yet: ``cancelled`` at once), ``interrupt``
(a deploy is building or deploying: ``stopping``, its deploy job asked to cancel, and a ``stop``
job deletes the VMs once that job has ended), ``stop`` (``stopping``, and a ``stop`` job deletes
the VMs) or ``none`` (already stopping or over)."""


def stop_action(deployment_id: str, state: str, *, deploy_job_live: bool) -> StopAction:
    """The pure decision behind ``DELETE /v1/deployments/{id}``.

    ``deploy_job_live``: the deployment's deploy job is still queued or running. A deploy in
    ``building``/``deploying`` whose job lives is interrupted (the job's worker stops at its
    next step and deletes whatever it created); one whose job has ended without finishing the
    deployment (its worker ran out of attempts) is moved by nothing any more, so it is stopped
    (the caller records it ``failed`` first, with why, the lifecycle's way to ``stopping``).
    """
    if state == "accepted":
        return "cancel"
    if state in ("running", "failed"):
        return "stop"
    if state in ("stopping", "stopped", "cancelled"):
        return "none"
    if state in ("building", "deploying"):
        return "interrupt" if deploy_job_live else "stop"
    raise InvalidInput(f"unknown deployment state {state!r} of deployment {deployment_id}")


def add_event(
    session: Session,
    deployment_id: str,
    phase: str,
    message: str,
    *,
    now: float,
    data: dict[str, Any] | None = None,
) -> int:
    """Append one progress event; returns its id (ids grow; the SSE stream resumes from one)."""
    result = session.connection().execute(
        _INSERT_EVENT,
        {
            "deployment_id": deployment_id,
            "phase": phase[:32],
            "message": message,
            "data": json.dumps(data or {}, sort_keys=True, default=str),
            "created_at": now,
        },
    )
    pk = result.inserted_primary_key
    return int(pk[0]) if pk else 0


def events_after(
    session: Session, deployment_id: str, after_id: int = 0, *, limit: int = 500
) -> list[DeploymentEvent]:
    rows = session.scalars(
        select(DeploymentEventRow)
        .where(DeploymentEventRow.deployment_id == deployment_id, DeploymentEventRow.id > after_id)
        .order_by(DeploymentEventRow.id)
        .limit(limit)
    )
    return [
        DeploymentEvent(
            id=r.id,
            deployment_id=DeploymentId(r.deployment_id),
            phase=r.phase,
            message=r.message,
            data=json.loads(r.data),
            created_at=r.created_at,
        )
        for r in rows
    ]


# --- idempotency ----------------------------------------------------------------------------------


def get_idempotency(session: Session, customer_id: str, key: str) -> IdempotencyRecord | None:
    row = session.scalars(
        select(IdempotencyRow).where(
            IdempotencyRow.customer_id == customer_id, IdempotencyRow.key == key
        )
    ).first()
    if row is None:
        return None
    return IdempotencyRecord(
        customer_id=row.customer_id,
        key=row.key,
        request_hash=row.request_hash,
        status_code=row.status_code,
        response=json.loads(row.response),
        created_at=row.created_at,
    )


def put_idempotency(
    session: Session,
    customer_id: str,
    key: str,
    *,
    request_hash: str,
    status_code: int,
    response: dict[str, Any],
    now: float,
) -> None:
    """Remember the response for ``key``; a concurrent duplicate fails on the unique constraint."""
    session.add(
        IdempotencyRow(
            customer_id=customer_id,
            key=key,
            request_hash=request_hash,
            status_code=status_code,
            response=json.dumps(response, sort_keys=True),
            created_at=now,
        )
    )
    session.flush()


# --- the Deployments seam for the deploy workflow -------------------------------------------------


class DeploymentRecords:
    """Implements ``deployer.api.Deployments``: each call is its own committed transaction."""

    def __init__(self, factory: sessionmaker[Session], clock: Clock = SYSTEM_CLOCK) -> None:
        self._factory = factory
        self._clock = clock

    def set_state(self, deployment_id: str, state: str, /, **fields: Any) -> None:
        now = self._clock.time_ns() / 1e9
        with self._factory() as session, session.begin():
            record_state(
                session,
                deployment_id,
                state,
                now=now,
                url=fields.get("url"),
                asset_id=fields.get("asset_id"),
                error=fields.get("error"),
                only_from=fields.get("only_from"),
            )

    def event(self, deployment_id: str, phase: str, message: str, /, **data: Any) -> None:
        now = self._clock.time_ns() / 1e9
        with self._factory() as session, session.begin():
            add_event(session, deployment_id, phase, message, now=now, data=data)

    def get(self, deployment_id: str) -> Deployment:
        with self._factory() as session:
            return get_deployment(session, deployment_id, tenant_id=None)
