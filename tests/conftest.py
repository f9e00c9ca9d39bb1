"""Shared fixtures. Area-specific fixtures live in each tests/<area>/conftest.py or in
``unkey_deploy.testing`` when several areas need them."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from unkey_deploy.core import config


@pytest.fixture
def settings(tmp_path: Path) -> config.Settings:
    """Settings for an isolated data dir under the test's tmp_path (SQLite, local blobs)."""
    return config.load(data_dir=tmp_path / "data")


@contextlib.contextmanager
def _postgres_database(suffix: str) -> Iterator[str]:
    """A fresh database ``<base db>_<suffix>`` on the server `make test` starts, dropped after.
    Needs a role that may create databases (the server `make test` starts has)."""
    base = os.environ.get("UNKEY_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("needs PostgreSQL: run through `make test`, which starts one on 127.0.0.1")
    url = make_url(base)
    name = f"{url.database or 'unkey'}_{suffix}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            c.execute(text(f'CREATE DATABASE "{name}"'))
        yield url.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this test worker's own, shared by the worker's tests (they use unique
    names and keys). One per xdist worker, not one for all: tests that run gc or scans with a
    fake clock far in the future would otherwise see (and collect) rows another worker's test
    is creating at that moment."""
    with _postgres_database(_worker()) as url:
        yield url


@pytest.fixture
def postgres_fresh_url() -> Iterator[str]:
    """An empty database for this test alone: for tests that consume a whole queue (a deployer
    worker claims every job of its kinds, whichever test enqueued it)."""
    with _postgres_database(f"{_worker()}_{uuid.uuid4().hex[:8]}") as url:
        yield url
