"""Shared fixtures. Area-specific fixtures live in each tests/<area>/conftest.py or in
``unkey_deploy.testing`` when several areas need them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unkey_deploy.core import config


@pytest.fixture
def settings(tmp_path: Path) -> config.Settings:
    """Settings for an isolated data dir under the test's tmp_path (SQLite, local blobs)."""
    return config.load(data_dir=tmp_path / "data")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    url = os.environ.get("UNKEY_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("needs PostgreSQL: run through `make test`, which starts one on 127.0.0.1")
    return url
