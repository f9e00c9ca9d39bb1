"""Fixtures for the usage store: a migrated chDB per test (its own tmp path, closed after)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from unkey_deploy.clickhouse.chdb_backend import ChdbStorage


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChdbStorage]:
    s = ChdbStorage(tmp_path / "ch")
    s.migrate()
    try:
        yield s
    finally:
        s.close()
