"""Gateway behaviour below the CLI: ids, limits, metrics, token buckets, ES256 JWTs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from unkey_deploy.core.clock import FakeClock
from unkey_deploy.core.config import GatewayConfig
from unkey_deploy.core.errors import NotFound, RateLimited, Unauthenticated
from unkey_deploy.gateway.auth import Authenticator
from unkey_deploy.gateway.ratelimit import TokenBuckets
from unkey_deploy.gateway.tls import client_context
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db
from unkey_deploy.testing.gateway import RunningGateway, new_customer


def test_token_bucket_refills_at_the_configured_rate() -> None:
    clock = FakeClock()
    tb = TokenBuckets(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        tb.take("k")
    with pytest.raises(RateLimited) as info:
        tb.take("k")
    assert info.value.retry_after == pytest.approx(0.5)
    tb.take("other")  # separate bucket
    clock.advance(0.5)
    tb.take("k")
    with pytest.raises(RateLimited):
        tb.take("k")
    clock.advance(10)
    for _ in range(3):
        tb.take("k")  # refilled up to the burst, not beyond
    with pytest.raises(RateLimited):
        tb.take("k")


def test_es256_jwt_from_a_public_key_file(tmp_path: Path) -> None:
    priv = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "jwt.pub"
    pub.write_bytes(
        priv.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    engine = db.make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    db.upgrade(engine)
    factory = db.session_factory(engine)
    with db.transaction(factory) as s:
        c = cp.create_customer(s, "jwt-co", now=1.0)
    auth = Authenticator(GatewayConfig(jwt_public_key_file=pub), factory, FakeClock())
    claims = {
        "sub": c.id,
        "tenant_id": c.tenant_id,
        "iss": "unkey-deploy",
        "aud": "unkey-deploy",
        "exp": int(time.time()) + 60,
    }
    p = auth.verify_jwt(jwt.encode(claims, priv, algorithm="ES256"))
    assert (p.customer_id, p.tenant_id, p.method) == (c.id, c.tenant_id, "jwt")
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.verify_jwt(jwt.encode(claims, other, algorithm="ES256"))
    # An HS256 token signed with the public key as secret (key confusion) is refused.
    with pytest.raises(Unauthenticated):
        auth.verify_jwt(jwt.encode(claims, "not-the-key-" * 4, algorithm="HS256"))
    engine.dispose()


def test_request_ids_size_cap_admin_and_metrics(gateway: RunningGateway) -> None:
    c = new_customer(gateway)
    user = {"Authorization": f"Bearer {c.key}"}
    with httpx.Client(base_url=gateway.url, verify=client_context(gateway.ca_cert)) as h:
        a = h.get("/v1/whoami", headers=user)
        b = h.get("/v1/whoami", headers=user)
        assert a.headers["x-request-id"] != b.headers["x-request-id"]
        assert a.json()["request_id"] == a.headers["x-request-id"]
        assert a.headers["x-request-id"].startswith("req_")

        big = h.post("/v1/deploy", content=b"x" * 2_000_000, headers=user)
        assert big.status_code == 422 and "larger than" in big.json()["error"]["message"]

        nope = h.get("/v1/customers", headers=user)
        assert nope.status_code == 401 and nope.json()["error"]["code"] == "unauthenticated"
        missing = h.get("/v1/deployments")
        assert missing.status_code == 401 and "Authorization" in missing.json()["error"]["message"]

        metrics = h.get("/metrics").text
        assert (
            'unkey_gateway_requests_total{method="GET",route="/v1/whoami",status="200"}' in metrics
        )
    # JSON logs carry the request id and the customer.
    log = gateway.log_file.read_text()
    assert a.headers["x-request-id"] in log and c.id in log


def test_event_stream_resumes_after_last_event_id(gateway: RunningGateway) -> None:
    c = new_customer(gateway)
    spec = {"name": "sse", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "128MiB"}}
    with gateway.client(c.key) as client:
        dep_id = client.deploy(spec)["deployment"]["id"]
        engine = db.make_engine(gateway.database_url)
        records = cp.DeploymentRecords(db.session_factory(engine))
        for i in range(3):
            records.event(dep_id, "build", f"step {i}")
        engine.dispose()
        first = list(client.events(dep_id, follow=False))
        assert [e.data["message"] for e in first[:-1]] == [
            "deployment accepted", "step 0", "step 1", "step 2",
        ]  # fmt: skip
        assert first[-1].event == "end" and first[-1].data["state"] == "accepted"
        resumed = list(client.events(dep_id, follow=False, last_event_id=first[1].id))
        assert [e.data["message"] for e in resumed[:-1]] == ["step 1", "step 2"]
    other = new_customer(gateway)
    with gateway.client(other.key) as client, pytest.raises(NotFound):
        list(client.events(dep_id, follow=False))


def test_concurrent_requests_with_one_idempotency_key_make_one_deployment(
    gateway: RunningGateway,
) -> None:
    c = new_customer(gateway)
    spec = {"name": "idem", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "128MiB"}}
    results: list[str] = []

    def go() -> None:
        with gateway.client(c.key) as client:
            results.append(client.deploy(spec, idempotency_key="same")["deployment"]["id"])

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and len(set(results)) == 1
    with gateway.client(c.key) as client:
        assert len(client.list_deployments()["deployments"]) == 1
