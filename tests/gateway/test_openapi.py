"""The checked-in OpenAPI spec is the generated one, and real responses validate against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from unkey_deploy.gateway import openapi
from unkey_deploy.gateway.tls import client_context
from unkey_deploy.testing.gateway import RunningGateway, new_customer

SPEC_FILE = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_checked_in_spec_is_current() -> None:
    assert SPEC_FILE.read_text() == openapi.render(), (
        "docs/openapi.json is stale: run `make openapi`"
    )


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SPEC_FILE.read_text())
    return loaded


def _check(spec: dict[str, Any], route: str, method: str, resp: httpx.Response) -> None:
    op = spec["paths"][route][method.lower()]
    declared = op["responses"].get(str(resp.status_code))
    assert declared is not None, f"{method} {route} answered undeclared {resp.status_code}"
    schema = declared["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(
        resp.json()
    )
    assert resp.json()["request_id"] == resp.headers["x-request-id"]


def test_responses_validate_against_the_spec(gateway: RunningGateway, spec: dict[str, Any]) -> None:
    c = new_customer(gateway)
    user = {"Authorization": f"Bearer {c.key}"}
    admin = {"Authorization": f"Bearer {gateway.admin_token}"}
    app = {"name": "web", "image": "nginx:1.27", "resources": {"cpu": 2, "memory": "1GiB"}}
    with httpx.Client(base_url=gateway.url, verify=client_context(gateway.ca_cert)) as h:
        calls: list[tuple[str, str, httpx.Response]] = []

        def call(method: str, route: str, path: str | None = None, **kw: Any) -> httpx.Response:
            r = h.request(method, path or route, **kw)
            calls.append((route, method, r))
            return r

        call("GET", "/healthz")
        dep = call("POST", "/v1/deploy", json=app, headers=user).json()["deployment"]
        assert dep["state"] == "accepted"
        call("POST", "/v1/deploy", json={**app, "port": 0}, headers=user)  # 422
        call("POST", "/v1/deploy", json=app, headers={"Authorization": "Bearer uk_x"})  # 401
        call("POST", "/v1/deploy", json=app, headers={**user, "Idempotency-Key": "a"})
        call(
            "POST",
            "/v1/deploy",
            json={**app, "name": "b"},
            headers={**user, "Idempotency-Key": "a"},
        )
        call("GET", "/v1/deployments", headers=user)
        call("GET", "/v1/deployments/{deployment_id}", f"/v1/deployments/{dep['id']}", headers=user)
        call("GET", "/v1/deployments/{deployment_id}", "/v1/deployments/dep_nope", headers=user)
        gone = call("DELETE", "/v1/deployments/{deployment_id}", f"/v1/deployments/{dep['id']}",
                    headers=user)  # fmt: skip
        assert gone.status_code == 200 and gone.json()["deployment"]["state"] == "cancelled"
        call("DELETE", "/v1/deployments/{deployment_id}", "/v1/deployments/dep_nope", headers=user)
        key = call("POST", "/v1/keys", json={"name": "x"}, headers=user).json()["key"]
        call("GET", "/v1/keys", headers=user)
        call("DELETE", "/v1/keys/{key_id}", f"/v1/keys/{key['id']}", headers=user)
        call("GET", "/v1/whoami", headers=user)
        call("POST", "/v1/customers", json={"name": "spec-" + c.id[-6:]}, headers=admin)
        call("GET", "/v1/customers", headers=admin)
        call("GET", "/v1/customers/{customer_id}", f"/v1/customers/{c.id}", headers=admin)
        call("PATCH", "/v1/customers/{customer_id}", f"/v1/customers/{c.id}",
             json={"discount_pct": "5.25"}, headers=admin)  # fmt: skip
        call("PATCH", "/v1/customers/{customer_id}", f"/v1/customers/{c.id}",
             json={"discount_pct": "500"}, headers=admin)  # fmt: skip
        call("GET", "/v1/customers", headers=user)  # a customer key is not the admin token
    statuses = {r.status_code for _, _, r in calls}
    assert {200, 201, 202, 401, 404, 409, 422} <= statuses
    for route, method, resp in calls:
        _check(spec, route, method, resp)
