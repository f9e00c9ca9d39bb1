"""A real gatewayd over HTTPS for this area's tests (one per module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from unkey_deploy.testing.gateway import RunningGateway, running_gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("gw")) as gw:
        yield gw
