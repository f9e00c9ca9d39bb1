"""Tenant isolation on every route of the checked-in OpenAPI spec, and through the CLI.

Every operation in ``docs/openapi.json`` is called with customer A's key, with every path id
filled with customer B's object: the answer is 401/403/404 or A's own data, never anything of B's,
and B's objects are unchanged afterwards. New routes are covered without editing this file; only
routes that need the admin token or no auth at all must be listed here (a test fails otherwise).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from unkey_deploy.gateway.tls import client_context
from unkey_deploy.testing import gateway as tgw
from unkey_deploy.testing.gateway import RunningGateway, new_customer, run_unkey

SPEC = json.loads((Path(__file__).parents[2] / "docs" / "openapi.json").read_text())
OPERATIONS = [
    (method.upper(), path, op)
    for path, item in SPEC["paths"].items()
    for method, op in item.items()
    if method in {"get", "post", "put", "patch", "delete"}
]
# Routes without authentication.
PUBLIC = {("GET", "/healthz")}
# Operator routes: only the admin token opens them.
ADMIN = {
    ("GET", "/v1/customers"),
    ("POST", "/v1/customers"),
    ("GET", "/v1/customers/{customer_id}"),
    ("PATCH", "/v1/customers/{customer_id}"),
    ("GET", "/v1/customers/{customer_id}/bill"),
    ("GET", "/v1/customers/{customer_id}/invoices"),
    ("POST", "/v1/customers/{customer_id}/invoices/{month}/finalize"),
    ("GET", "/v1/usage/capacity"),
    ("GET", "/v1/hosts"),
    ("DELETE", "/v1/hosts/{host_id}"),
}
APP = {"name": "iso-app", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "128MiB"}}
# Bodies for operations that need one; anything else gets ``{}``.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/deploy"): APP,
    ("POST", "/v1/keys"): {"name": "from-a"},
    ("POST", "/v1/customers"): {"name": "made-by-a"},
    ("PATCH", "/v1/customers/{customer_id}"): {"discount_percent": "99", "credits": "1000000"},
}


@dataclass(frozen=True)
class World:
    a: tgw.TestCustomer
    b: tgw.TestCustomer
    b_deployment: str
    b_second_key_id: str
    b_second_key: str
    b_key_id: str
    b_customer_before: dict[str, Any]


def _http(gw: RunningGateway) -> httpx.Client:
    return httpx.Client(base_url=gw.url, verify=client_context(gw.ca_cert), timeout=30)


def _key_id(secret: str) -> str:
    return "key_" + secret.split("_")[1]


@pytest.fixture(scope="module")
def world(gateway: RunningGateway) -> World:
    a, b = new_customer(gateway), new_customer(gateway)
    with gateway.client(b.key) as cb:
        dep = cb.deploy({**APP, "name": "b-secret-app"})["deployment"]["id"]
        second = cb.create_key("b-second")
    with gateway.client() as admin:
        before = admin.get_customer(b.id)["customer"]
    return World(a, b, dep, second["key"]["id"], second["secret"], _key_id(b.key), before)


def _b_markers(w: World) -> list[str]:
    return [
        w.b.id,
        w.b.tenant_id,
        w.b_deployment,
        w.b_key_id,
        w.b_second_key_id,
        "b-secret-app",
        "b-second",
    ]


def _fill(path: str, w: World) -> str:
    ids = {
        "deployment_id": w.b_deployment,
        "key_id": w.b_second_key_id,
        "customer_id": w.b.id,
        "month": "2026-11",
        # no host belongs to B: the route is the operator's whatever the id
        "host_id": "host_x",
    }

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        assert name in ids, f"no B object for path parameter {name!r}: add one to _fill"
        return ids[name]

    return re.sub(r"\{(\w+)\}", sub, path)


def _call(h: httpx.Client, method: str, path: str, w: World, token: str) -> httpx.Response:
    params = {"follow": "false"} if path.endswith("/events") else {}
    body = BODIES.get((method, path), {}) if method in {"POST", "PUT", "PATCH"} else None
    return h.request(
        method,
        _fill(path, w),
        params=params,
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    )


def test_every_spec_route_is_classified() -> None:
    """Public and admin routes are listed by name; every other route is customer-scoped."""
    known = {(m, p) for m, p, _ in OPERATIONS}
    assert known >= PUBLIC | ADMIN, f"stale entries: {(PUBLIC | ADMIN) - known}"
    assert len(OPERATIONS) >= 15
    for m, p, op in OPERATIONS:
        if "admin" in op.get("tags", []):
            assert (m, p) in ADMIN, f"{m} {p} is tagged admin but not listed in ADMIN"


@pytest.mark.parametrize(
    ("method", "path"),
    [(m, p) for m, p, _ in OPERATIONS if (m, p) not in PUBLIC],
    ids=str,
)
def test_a_never_sees_or_changes_b(
    gateway: RunningGateway, world: World, method: str, path: str
) -> None:
    with _http(gateway) as h:
        resp = _call(h, method, path, world, world.a.key)
        if (method, path) in ADMIN:
            assert resp.status_code in (401, 403), (method, path, resp.status_code, resp.text)
        elif re.search(r"\{(?!month\})\w+\}", path):
            # The only ids in the path are B's: A must not find them.
            assert resp.status_code in (403, 404), (method, path, resp.status_code, resp.text)
        else:
            # A customer-scoped listing/creation: A gets an answer about A only.
            assert resp.status_code < 500, (method, path, resp.status_code, resp.text)
        # Echoing the id A itself sent (``... key_X not found``) reveals nothing.
        for marker in [m for m in _b_markers(world) if m not in _fill(path, world)]:
            assert marker not in resp.text, f"{method} {path} leaked {marker}: {resp.text[:500]}"
        # Anything that answers with a customer must name A.
        if resp.headers.get("content-type", "").startswith("application/json"):
            body = resp.json()
            for found in re.findall(r'"customer_id":\s*"([^"]+)"', resp.text):
                assert found == world.a.id, (method, path, body)

        # Admin routes also refuse a JWT of A's and B's own second key.
        if (method, path) in ADMIN:
            again = _call(h, method, path, world, world.b_second_key)
            assert again.status_code in (401, 403)


def test_b_is_unchanged_after_a_tried_everything(gateway: RunningGateway, world: World) -> None:
    with _http(gateway) as h:
        for method, path, _ in OPERATIONS:
            if (method, path) not in PUBLIC:
                _call(h, method, path, world, world.a.key)
    with gateway.client(world.b_second_key) as cb:
        assert cb.whoami()["customer_id"] == world.b.id  # B's second key was not revoked
        dep = cb.get_deployment(world.b_deployment)["deployment"]
        assert dep["customer_id"] == world.b.id and dep["name"] == "b-secret-app"
        # A's DELETE of it (404) neither cancelled nor stopped it
        assert dep["state"] == "accepted", dep
        assert [d["id"] for d in cb.list_deployments()["deployments"]] == [world.b_deployment]
        keys = {k["id"]: k for k in cb.list_keys()["keys"]}
        assert set(keys) == {world.b_key_id, world.b_second_key_id}
        assert all(k.get("revoked_at") is None for k in keys.values())
    with gateway.client() as admin:
        assert admin.get_customer(world.b.id)["customer"] == world.b_customer_before
        names = [c["name"] for c in admin.list_customers()["customers"]]
        assert "made-by-a" not in names
    with gateway.client(world.a.key) as ca:
        # A's own deploys were accepted for A, never attributed to B.
        for d in ca.list_deployments()["deployments"]:
            assert d["customer_id"] == world.a.id and d["tenant_id"] == world.a.tenant_id


def test_a_bill_is_a_bill_of_a(gateway: RunningGateway, world: World) -> None:
    with _http(gateway) as h:
        resp = h.get("/v1/bill", headers={"Authorization": f"Bearer {world.a.key}"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["invoice"]["customer_id"] == world.a.id
        # The operator route for B's bill refuses A's key.
        other = h.get(
            f"/v1/customers/{world.b.id}/bill", headers={"Authorization": f"Bearer {world.a.key}"}
        )
        assert other.status_code == 401


def test_cli_show_revoke_bill_across_tenants(gateway: RunningGateway, world: World) -> None:
    shown = run_unkey(gateway, "deployments", "show", world.b_deployment, api_key=world.a.key)
    assert shown.code == 4, shown
    assert "b-secret-app" not in shown.out + shown.err

    revoked = run_unkey(gateway, "keys", "revoke", world.b_second_key_id, api_key=world.a.key)
    assert revoked.code == 4, revoked
    with gateway.client(world.b_second_key) as cb:
        assert cb.whoami()["customer_id"] == world.b.id

    bill = run_unkey(gateway, "bill", "--json", api_key=world.a.key)
    assert bill.code == 0, bill
    assert json.loads(bill.out)["customer_id"] == world.a.id
    operator = run_unkey(
        gateway, "bill", "--customer", world.b.id, "--month", "2026-11", "--json",
        api_key=world.a.key, UNKEY_ADMIN_TOKEN="",
    )  # fmt: skip
    assert operator.code == 3, operator
    assert world.b.tenant_id not in operator.out


def test_jwt_of_a_naming_b_tenant_is_refused(
    gateway: RunningGateway, world: World, jwt_secret: str
) -> None:
    import time

    import jwt

    claims = {
        "sub": world.a.id,
        "tenant_id": world.b.tenant_id,
        "iss": "unkey-deploy",
        "aud": "unkey-deploy",
        "exp": int(time.time()) + 60,
    }
    with _http(gateway) as h:
        mixed = jwt.encode(claims, jwt_secret, algorithm="HS256")
        r = h.get(
            f"/v1/deployments/{world.b_deployment}", headers={"Authorization": f"Bearer {mixed}"}
        )
        assert r.status_code == 401 and "b-secret-app" not in r.text
        own = jwt.encode({**claims, "tenant_id": world.a.tenant_id}, jwt_secret, algorithm="HS256")
        r = h.get(
            f"/v1/deployments/{world.b_deployment}", headers={"Authorization": f"Bearer {own}"}
        )
        assert r.status_code == 404
        r = h.get("/v1/customers", headers={"Authorization": f"Bearer {own}"})
        assert r.status_code == 401
