"""Asset-manager fixtures: a migrated SQLite control-plane DB, a fake clock, moto's S3 server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from unkey_deploy.core.clock import FakeClock
from unkey_deploy.store.db import make_engine, session_factory, upgrade


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """The index on SQLite (default) and on PostgreSQL (a database per worker; unique keys)."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'control.db'}"
    engine = make_engine(url)
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible HTTP server on a free 127.0.0.1 port (a real server, over HTTP)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
