"""What a hostile or careless client sends gatewayd, over real HTTPS: each is refused with a
named error (never a 500), and nothing is recorded for it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from unkey_deploy.gateway.tls import client_context
from unkey_deploy.testing.gateway import RunningGateway, new_customer

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
