"""Shared fixtures. Area-specific fixtures live in each tests/<area>/conftest.py or in
``unkey_deploy.testing`` when several areas need them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from unkey_deploy.core import config


@pytest.fixture
def settings(tmp_path: Path) -> config.Settings:
    """Settings for an isolated data dir under the test's tmp_path (SQLite, local blobs)."""
    return config.load(data_dir=tmp_path / "data")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this test worker's own on the PostgreSQL server `make test` starts.

    One database per xdist worker, not one for all: tests that run gc or scans with a fake clock
    far in the future would otherwise see (and collect) rows another worker's test is creating
    at that moment. Needs a role that may create databases (the server `make test` starts has)."""
    base = os.environ.get("UNKEY_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("needs PostgreSQL: run through `make test`, which starts one on 127.0.0.1")
    url = make_url(base)
    name = f"{url.database or 'unkey'}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
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
