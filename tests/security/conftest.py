"""Security tests: one real gatewayd per module (HS256 JWTs on, a high rate limit for sweeps)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from unkey_deploy.testing.gateway import RunningGateway, running_gateway

JWT_SECRET = "sec-" + secrets.token_hex(24)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(
        tmp_path_factory.mktemp("gw"),
        rate_limit_per_s=10_000.0,
        rate_limit_burst=10_000,
        jwt_secret=JWT_SECRET,
    ) as gw:
        yield gw


@pytest.fixture(scope="session")
def jwt_secret() -> str:
    """The HS256 secret of the module gateways."""
    return JWT_SECRET
