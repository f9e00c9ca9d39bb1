"""A real gatewayd hosting the billing service whose aggregator consumes a real nats-server, so
usage imported with ``unkey usage import`` (billaged -> JetStream -> aggregator -> chDB) shows up
in the dashboard."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from unkey_deploy.bus.server import NatsServer
from unkey_deploy.testing.gateway import RunningGateway, running_gateway
from unkey_deploy.testing.nats import running_nats


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with running_nats(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def billing_gateway(tmp_path: Path, nats_server: NatsServer) -> Iterator[RunningGateway]:
    with running_gateway(
        tmp_path / "gw", timeout_s=60, extra_env={"UNKEY_BUS__NATS_URL": nats_server.url}
    ) as gw:
        yield gw
