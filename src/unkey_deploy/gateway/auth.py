"""Who is calling: API keys and JWTs -> a :class:`Principal`; admin tokens for operator routes.

Other routers reuse the same authentication (and per-key rate limiting)::

    from fastapi import APIRouter, Depends
    from unkey_deploy.gateway.auth import Principal, require_principal

    router = APIRouter()

    @router.get("/v1/invoices")
    def invoices(principal: Principal = Depends(require_principal)) -> ...:
        ...  # principal.customer_id, principal.tenant_id, principal.key_id

``require_admin`` guards operator routes (``Authorization: Bearer <admin token>``).

API keys look like ``uk_<26 chars>_<48 hex>``: the middle part is the key id (``key_<26 chars>``),
the rest a 192-bit secret stored only as its SHA-256. Lookup is by key id, comparison constant
time; records are cached for :attr:`Authenticator.cache_ttl_s` so the hot path does no database
work, and a revocation through this process takes effect at once (other processes: within the TTL).

JWTs are verified with the configured HS256 secret or RS256/ES256 public key, must carry ``exp``,
``iss`` and ``aud`` (matching the config), and name the customer in ``customer_id`` (or ``sub``)
and the tenant in ``tenant_id``; the customer must exist in that tenant.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from dataclasses import dataclass
from typing import Any

import jwt
from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from ..core.clock import Clock
from ..core.config import GatewayConfig
from ..core.errors import Forbidden, NotFound, Unauthenticated
from ..core.ids import CustomerId, TenantId
from ..core.log import bind
from ..store import controlplane as cp
from .ratelimit import TokenBuckets


@dataclass(frozen=True)
class Principal:
    """The authenticated caller. ``key_id`` is the API key id, or ``jwt:<customer_id>``."""

    customer_id: CustomerId
    tenant_id: TenantId
    key_id: str
    method: str  # "api_key" | "jwt"


_SUGGEST_KEY = "pass `Authorization: Bearer uk_...` (create one with `unkey keys create`)"


class Authenticator:
    """Turns an ``Authorization`` header into a Principal (see the module docstring)."""

    cache_ttl_s = 2.0

    def __init__(self, config: GatewayConfig, factory: sessionmaker[Session], clock: Clock) -> None:
        self.config = config
        self.factory = factory
        self.clock = clock
        self._keys: dict[str, tuple[cp.ApiKey | None, float]] = {}
        self._customers: dict[str, tuple[cp.Customer | None, float]] = {}
        self._lock = threading.Lock()
        self._jwt_key: Any = None
        self._jwt_algs: list[str] = []
        if config.jwt_public_key_file is not None:
            pem = config.jwt_public_key_file.read_bytes()
            self._jwt_key = pem
            self._jwt_algs = ["RS256", "ES256"]
        elif config.jwt_secret:
            self._jwt_key = config.jwt_secret
            self._jwt_algs = ["HS256"]

    # -- API keys ---------------------------------------------------------------------------------

    def _cached_key(self, key_id: str) -> tuple[bool, cp.ApiKey | None]:
        now = self.clock.monotonic()
        with self._lock:
            hit = self._keys.get(key_id)
        if hit is not None and now - hit[1] < self.cache_ttl_s:
            return True, hit[0]
        return False, None

    def load_key(self, key_id: str) -> cp.ApiKey | None:
        with self.factory() as session:
            key = cp.find_api_key(session, key_id)
        with self._lock:
            if len(self._keys) > 100_000:
                self._keys.clear()
            self._keys[key_id] = (key, self.clock.monotonic())
        return key

    def forget_key(self, key_id: str) -> None:
        """Drop a cached key (called on revocation)."""
        with self._lock:
            self._keys.pop(key_id, None)

    def check_key(self, key: cp.ApiKey | None, secret: str) -> Principal:
        if key is None or not key.matches(secret):
            raise Unauthenticated("invalid API key", suggestion=_SUGGEST_KEY)
        if key.revoked_at is not None:
            raise Unauthenticated("this API key was revoked", suggestion=_SUGGEST_KEY)
        return Principal(key.customer_id, key.tenant_id, key.id, "api_key")

    # -- JWT --------------------------------------------------------------------------------------

    def _customer(self, customer_id: str) -> cp.Customer | None:
        now = self.clock.monotonic()
        with self._lock:
            hit = self._customers.get(customer_id)
        if hit is not None and now - hit[1] < self.cache_ttl_s:
            return hit[0]
        with self.factory() as session:
            try:
                c: cp.Customer | None = cp.get_customer(session, customer_id)
            except NotFound:
                c = None
        with self._lock:
            self._customers[customer_id] = (c, now)
        return c

    def verify_jwt(self, token: str) -> Principal:
        if self._jwt_key is None:
            raise Unauthenticated(
                "JWT authentication is not configured on this gateway",
                suggestion="use an API key, or set gateway.jwt_secret / jwt_public_key_file",
            )
        try:
            claims = jwt.decode(
                token,
                self._jwt_key,
                algorithms=self._jwt_algs,
                audience=self.config.jwt_audience,
                issuer=self.config.jwt_issuer,
                options={"require": ["exp", "iss", "aud"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", suggestion="get a fresh token") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        customer_id = claims.get("customer_id") or claims.get("sub")
        tenant_id = claims.get("tenant_id")
        if not isinstance(customer_id, str) or not isinstance(tenant_id, str):
            raise Unauthenticated("token must carry customer_id (or sub) and tenant_id claims")
        customer = self._customer(customer_id)
        if customer is None or customer.tenant_id != tenant_id:
            raise Unauthenticated("token names an unknown customer or tenant")
        return Principal(customer.id, customer.tenant_id, f"jwt:{customer.id}", "jwt")


@dataclass
class GatewayState:
    """What the routes need, kept on ``app.state.gateway``."""

    config: GatewayConfig
    factory: sessionmaker[Session]
    clock: Clock
    auth: Authenticator
    limiter: TokenBuckets
    admin_token: str | None
    write_lock: contextlib.AbstractContextManager[Any]
    inline_writes: bool = False


def state_of(request: Request) -> GatewayState:
    st: GatewayState = request.app.state.gateway
    return st


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated("missing Authorization header", suggestion=_SUGGEST_KEY)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("Authorization must be `Bearer <token>`", suggestion=_SUGGEST_KEY)
    return token


async def require_principal(request: Request) -> Principal:
    """FastAPI dependency: authenticate the caller and take one rate-limit token for its key."""
    st = state_of(request)
    token = _bearer(request)
    if token.startswith(cp.API_KEY_PREFIX):
        parsed = cp.parse_api_key(token)
        if parsed is None:
            raise Unauthenticated("malformed API key", suggestion=_SUGGEST_KEY)
        key_id, secret = parsed
        hit, key = st.auth._cached_key(key_id)
        if not hit:
            key = await run_in_threadpool(st.auth.load_key, key_id)
        principal = st.auth.check_key(key, secret)
    elif token.count(".") == 2:
        principal = await run_in_threadpool(st.auth.verify_jwt, token)
    else:
        raise Unauthenticated("unrecognized credentials", suggestion=_SUGGEST_KEY)
    st.limiter.take(principal.key_id)
    request.state.principal = principal
    bind(customer_id=principal.customer_id, tenant_id=principal.tenant_id)
    return principal


async def require_admin(request: Request) -> None:
    """FastAPI dependency for operator routes: the admin token, compared in constant time."""
    st = state_of(request)
    token = _bearer(request)
    if st.admin_token is None:
        raise Forbidden("no admin token is configured on this gateway")
    if not hmac.compare_digest(token.encode(), st.admin_token.encode()):
        raise Unauthenticated(
            "invalid admin token", suggestion="use the token in <data dir>/admin-token"
        )


__all__ = ["GatewayState", "Principal", "require_admin", "require_principal"]
