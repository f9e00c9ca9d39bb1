from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from unkey_deploy.bus.server import NatsServer
from unkey_deploy.testing.nats import running_nats


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with running_nats(tmp_path / "nats") as server:
        yield server
