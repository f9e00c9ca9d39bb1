"""Run gatewayd as a process (``unkey gatewayd``): migrate, load TLS and admin token, serve.

Files under the data dir (created by ``unkey dev up``, or here on first start):
``tls/gateway.crt`` + ``tls/gateway.key`` (self-signed) and ``admin-token`` (mode 0600).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI

from ..core import log
from ..core.config import Settings
from ..store import db
from .app import create_app
from .tls import ensure_self_signed

# Routers of other areas mounted into the gateway when their module exists: "module:attribute".
EXTRA_ROUTERS = (
    "unkey_deploy.billing.http:router",
    "unkey_deploy.gateway.dashboard:router",
    "unkey_deploy.gateway.logs:router",
)

_log = log.get("unkey.gatewayd")


def extra_routers() -> list[APIRouter]:
    out = []
    for spec in EXTRA_ROUTERS:
        module, _, attr = spec.partition(":")
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
            continue
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            found = None
        if found is None:
            continue
        router = getattr(importlib.import_module(module), attr)
        if not isinstance(router, APIRouter):
            raise TypeError(f"{spec} is not a fastapi.APIRouter")
        out.append(router)
    return out


def tls_files(settings: Settings) -> tuple[Path, Path]:
    cfg = settings.gateway
    tls_dir = settings.data_dir / "tls"
    return (cfg.cert_file or tls_dir / "gateway.crt", cfg.key_file or tls_dir / "gateway.key")


def cert_hosts(host: str) -> tuple[str, ...]:
    """What a generated certificate names beside localhost: the address gatewayd listens on
    (a client of another machine connects to it) unless that is a wildcard, and this machine's
    names (what clients use with a wildcard)."""
    names = [] if host in ("", "0.0.0.0", "::") else [host]  # noqa: S104 (not a bind)
    names += [socket.gethostname(), socket.getfqdn()]
    fixed = ("localhost", "127.0.0.1", "::1")
    return tuple(dict.fromkeys(n for n in names if n and n.isascii() and n not in fixed))


def admin_token_file(settings: Settings) -> Path:
    return settings.data_dir / "admin-token"


def ensure_admin_token(settings: Settings) -> str:
    """The configured admin token, else the one in ``<data_dir>/admin-token`` (made if absent)."""
    if settings.gateway.admin_token:
        return settings.gateway.admin_token
    path = admin_token_file(settings)
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "ukadm_" + secrets.token_hex(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def _host_billing(app: FastAPI, settings: Settings) -> None:
    """Serve usage queries from this process, and run the aggregator here too unless
    ``billing.embedded_in_gateway`` is off.

    chDB, the embedded default, can be opened by one process only, so on one machine the
    gateway hosts the whole billing service. With a ClickHouse server
    (``billing.clickhouse_url``) the aggregator can run on its own
    (``python -m unkey_deploy.billing.service``) and the gateway only queries.
    """
    from ..billing.service import start_in_process  # noqa: PLC0415 (optional area)

    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        runtime = await start_in_process(settings, consume=settings.billing.embedded_in_gateway)
        app.state.billing = runtime.queries
        try:
            async with inner(a) as state:
                yield state
        finally:
            await runtime.stop()

    app.router.lifespan_context = lifespan


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn finishes in-flight requests first)."""
    log.configure("gatewayd", settings.log_level)
    engine = db.make_engine(settings.resolved_database_url)
    db.upgrade(engine)
    admin = ensure_admin_token(settings)
    app = create_app(
        settings,
        routers=extra_routers(),
        factory=db.session_factory(engine),
        admin_token=admin,
    )
    _host_billing(app, settings)
    cfg = settings.gateway
    ssl: dict[str, str] = {}
    if cfg.tls:
        cert, key = tls_files(settings)
        if ensure_self_signed(cert, key, hosts=cert_hosts(cfg.host)):
            log.event(_log, "generated a self-signed certificate", cert=str(cert))
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    scheme = "https" if cfg.tls else "http"
    log.event(_log, "listening", url=f"{scheme}://{cfg.host}:{cfg.port}")
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        backlog=2048,
        **ssl,  # type: ignore[arg-type]
    )
    uvicorn.Server(config).run()
    engine.dispose()
