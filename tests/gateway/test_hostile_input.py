"""What a hostile or careless client sends gatewayd, over real HTTPS: each is refused with a
named error (never a 500), and nothing is recorded for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from unkey_deploy.gateway.tls import client_context
from unkey_deploy.testing.gateway import RunningGateway, new_customer, running_gateway

SPEC = {"name": "hostile", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "128MiB"}}


def test_a_chunked_body_over_the_size_limit_is_refused(gateway: RunningGateway) -> None:
    """Without a Content-Length (chunked transfer encoding) the body is counted as it comes: a
    5 MB body is refused past the 1 MiB limit instead of being read whole and parsed."""
    c = new_customer(gateway)

    def body() -> Iterator[bytes]:
        yield b'{"name": "big", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "1GB"},'
        yield b' "labels": {"a": "'
        for _ in range(50):
            yield b"x" * 100_000
        yield b'"}}'

    with httpx.Client(base_url=gateway.url, verify=client_context(gateway.ca_cert)) as h:
        r = h.post(
            "/v1/deploy",
            content=body(),
            headers={"Authorization": f"Bearer {c.key}", "Content-Type": "application/json"},
        )
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_input"
        assert "larger than 1048576 bytes" in err["message"]
    with gateway.client(c.key) as client:
        assert client.list_deployments()["deployments"] == []


@pytest.mark.postgres
def test_nul_characters_are_refused_not_an_internal_error(
    tmp_path: Path, postgres_url: str
) -> None:
    """PostgreSQL cannot hold a NUL in text (psycopg refuses the parameter): a NUL in a path id,
    a query parameter or a body field used to reach the database and come back as a 500."""
    with running_gateway(tmp_path / "gw", database_url=postgres_url) as gw:
        c = new_customer(gw)
        user = {"Authorization": f"Bearer {c.key}"}
        admin = {"Authorization": f"Bearer {gw.admin_token}"}
        with httpx.Client(base_url=gw.url, verify=client_context(gw.ca_cert)) as h:
            answers = {
                "get deployment": h.get("/v1/deployments/dep_%00", headers=user),
                "events": h.get("/v1/deployments/%00/events", headers=user),
                "stop": h.delete("/v1/deployments/%00", headers=user),
                "revoke key": h.delete("/v1/keys/key_%00", headers=user),
                "list by state": h.get("/v1/deployments", params={"state": "\0"}, headers=user),
                "get customer": h.get("/v1/customers/%00", headers=admin),
                "forget host": h.delete("/v1/hosts/%00", headers=admin),
            }
            for what, r in answers.items():
                assert r.status_code == 422, (what, r.text)
                assert "NUL" in r.json()["error"]["message"], (what, r.text)
            bodies = {
                "key name": h.post("/v1/keys", json={"name": "a\0b"}, headers=user),
                "customer name": h.post("/v1/customers", json={"name": "x\0"}, headers=admin),
                "customer email": h.post(
                    "/v1/customers", json={"name": "nul-mail", "email": "a\0@b"}, headers=admin
                ),
                "tier": h.patch(
                    f"/v1/customers/{c.id}", json={"pricing_tier": "pro\0"}, headers=admin
                ),
            }
            for what, r in bodies.items():
                assert r.status_code == 422, (what, r.text)
                (problem,) = r.json()["error"]["problems"]
                assert "NUL" in problem["msg"], (what, r.text)
        with gw.client(c.key) as client:
            assert [k["name"] for k in client.list_keys()["keys"]] == ["default"]


def test_listing_by_an_unknown_state_is_refused_not_an_empty_list(gateway: RunningGateway) -> None:
    """A typo (``--state runing``) used to answer 200 with no deployments, as if there were
    none in that state."""
    c = new_customer(gateway)
    with gateway.client(c.key) as client:
        client.deploy(SPEC)
    with httpx.Client(base_url=gateway.url, verify=client_context(gateway.ca_cert)) as h:
        user = {"Authorization": f"Bearer {c.key}"}
        typo = h.get("/v1/deployments", params={"state": "runing"}, headers=user)
        assert typo.status_code == 422, typo.text
        (problem,) = typo.json()["error"]["problems"]
        assert problem["loc"] == "query.state"
        assert "'runing'" in problem["msg"] and "accepted, building, deploying" in problem["msg"]
        ok = h.get("/v1/deployments", params={"state": "accepted"}, headers=user)
        assert ok.status_code == 200 and len(ok.json()["deployments"]) == 1


def test_a_body_that_is_not_a_json_object_says_what_it_is(gateway: RunningGateway) -> None:
    """``curl -d @app.json`` sends a form Content-Type; a JSON list or null is not an app: the
    error names the Content-Type or the JSON type, not pydantic's 'a valid dictionary or object
    to extract fields from'."""
    c = new_customer(gateway)
    user = {"Authorization": f"Bearer {c.key}"}
    good = b'{"name": "web", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "1GB"}}'
    with httpx.Client(base_url=gateway.url, verify=client_context(gateway.ca_cert)) as h:
        for ctype, body, fragment in [
            ("application/x-www-form-urlencoded", good, "Content-Type: application/json"),
            ("text/plain", good, "got text/plain"),
            ("application/json", b"[1, 2]", "must be a JSON object, not a list"),
            ("application/json", b"null", "must be a JSON object, not null"),
        ]:
            r = h.post("/v1/deploy", content=body, headers={**user, "Content-Type": ctype})
            assert r.status_code == 422, r.text
            (problem,) = r.json()["error"]["problems"]
            assert fragment in problem["msg"], (ctype, body, problem)
    with gateway.client(c.key) as client:
        assert client.list_deployments()["deployments"] == []


@pytest.mark.parametrize("image", ["oci:/etc", "docker-archive:/etc/shadow", "oci:./layout"])
def test_a_deploy_naming_the_platforms_own_files_is_refused(
    gateway: RunningGateway, image: str
) -> None:
    """``oci:PATH`` and ``docker-archive:PATH`` name files of the builder's host: a customer
    got them opened for them (their existence told, or an image built of them). Refused at
    the API (422 naming the image), nothing recorded; builderd refuses them too."""
    c = new_customer(gateway)
    with httpx.Client(base_url=gateway.url, verify=client_context(gateway.ca_cert)) as h:
        r = h.post("/v1/deploy", json={**SPEC, "image": image},
                   headers={"Authorization": f"Bearer {c.key}"})  # fmt: skip
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_input" and err["message"].startswith("image: ")
    assert "does not build from" in err["message"]
    with gateway.client(c.key) as client:
        assert client.list_deployments()["deployments"] == []
