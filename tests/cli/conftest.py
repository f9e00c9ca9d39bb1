"""A real gatewayd over HTTPS, one per module (tests use fresh customers, so keys never share
rate-limit buckets), and the stand-in for the deploy workflow a `unkey deploy --wait` follows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from unkey_deploy.testing.deploys import DeployDriver
from unkey_deploy.testing.gateway import RunningGateway, running_gateway

JWT_SECRET = "test-secret-" + "x" * 32


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(
        tmp_path_factory.mktemp("gw"),
        rate_limit_per_s=0.05,  # one token per 20 s: a slow CLI start never refills a bucket
        rate_limit_burst=12,
        jwt_secret=JWT_SECRET,
    ) as gw:
        yield gw


@pytest.fixture(scope="module")
def drive_deploy(gateway: RunningGateway) -> Iterator[DeployDriver]:
    """Drives the deployment a `unkey deploy --wait` creates (unkey_deploy.testing.deploys)."""
    driver = DeployDriver(gateway.database_url)
    yield driver
    driver.close()
