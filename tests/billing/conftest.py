from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from unkey_deploy.bus.server import NatsServer
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.testing.nats import running_nats


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[ChdbStorage]:
    st = ChdbStorage(tmp_path / "ch")
    st.migrate()
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with running_nats(tmp_path / "nats") as server:
        yield server
