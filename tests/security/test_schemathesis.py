"""schemathesis against the checked-in ``docs/openapi.json`` on a real gatewayd: no 5xx and every
response matches its documented schema. Customer routes are driven with a customer's API key,
operator routes with the admin token; examples are bounded so each run stays well under 60 s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from unkey_deploy.testing.gateway import RunningGateway, new_customer

SPEC = Path(__file__).parents[2] / "docs" / "openapi.json"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
ADMIN_PATHS = r"^/v1/(customers|usage/capacity)"


def _run(gw: RunningGateway, token: str, *select: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(SCHEMATHESIS), "run", str(SPEC),
            "--url", gw.url,
            "--tls-verify", str(gw.ca_cert),
            "-H", f"Authorization: Bearer {token}",
            "--checks", "not_a_server_error,response_schema_conformance",
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", "8",
            "--seed", "20261126",
            "--request-timeout", "10",
            "--max-time", "25",
            "--no-color",
            *select,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_customer_routes_no_5xx_no_schema_violation(gateway: RunningGateway) -> None:
    c = new_customer(gateway)
    p = _run(gateway, c.key, "--exclude-path-regex", ADMIN_PATHS)
    assert p.returncode == 0, p.stdout[-8000:] + p.stderr[-2000:]
    assert "Tested: " in p.stdout and " generated" in p.stdout, p.stdout[-2000:]


@pytest.mark.slow
def test_admin_routes_no_5xx_no_schema_violation(gateway: RunningGateway) -> None:
    p = _run(gateway, gateway.admin_token, "--include-path-regex", ADMIN_PATHS)
    assert p.returncode == 0, p.stdout[-8000:] + p.stderr[-2000:]
    assert "Tested: " in p.stdout, p.stdout[-2000:]
