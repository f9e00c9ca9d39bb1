"""Where the registry client sends credentials when a blob request is redirected.

The registry here is an https host (not loopback), which needs TLS; instead of a certificate
chain the client gets an ``httpx.MockTransport`` that answers like a registry and records every
request exactly as the client sent it (the header policy under test is the client's own).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import pytest

from unkey_deploy.builder.oci import Descriptor, Reference, RegistryClient
from unkey_deploy.core.config import BuilderConfig
from unkey_deploy.core.errors import ImageError

BLOB = b"layer bytes" * 100
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
CREDS = ("user", "secret")


def _client(location: str, seen: list[tuple[str, str | None]]) -> RegistryClient:
    def handler(req: httpx.Request) -> httpx.Response:
        url = str(req.url)
        seen.append((url, req.headers.get("authorization")))
        if req.url.path.startswith("/v2/") and "authorization" not in req.headers:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="reg"'})
        if req.url.path == f"/v2/app/blobs/{DIGEST}":
            return httpx.Response(307, headers={"Location": location})
        if req.url.path.startswith("/storage/"):
            return httpx.Response(200, stream=httpx.ByteStream(BLOB))
        return httpx.Response(404)

    return RegistryClient(
        credentials={"reg.example": CREDS}, transport=httpx.MockTransport(handler)
    )


def _pull(location: str) -> list[tuple[str, str | None]]:
    seen: list[tuple[str, str | None]] = []
    with _client(location, seen) as c:
        ref = Reference.parse("reg.example/app:latest")
        desc = Descriptor("application/vnd.oci.image.layer.v1.tar", DIGEST, len(BLOB))
        assert c.read_blob(ref, desc, max_bytes=1 << 20) == BLOB
    return seen


def test_downgrade_redirect_to_plain_http_on_the_same_host_gets_no_credentials() -> None:
    seen = _pull("http://reg.example/storage/blob?sig=1")
    assert seen[0] == (f"https://reg.example/v2/app/blobs/{DIGEST}", None)  # challenge
    assert seen[1][0].startswith("https://") and seen[1][1] and seen[1][1].startswith("Basic ")
    assert seen[2] == ("http://reg.example/storage/blob?sig=1", None)


def test_same_origin_redirect_keeps_credentials_other_hosts_get_none() -> None:
    same = _pull("/storage/blob")
    assert same[-1][0] == "https://reg.example/storage/blob"
    assert same[-1][1] is not None and same[-1][1].startswith("Basic ")
    other = _pull("https://cdn.example/storage/blob")
    assert other[-1] == ("https://cdn.example/storage/blob", None)


def test_a_malformed_redirect_location_is_an_image_error() -> None:
    """A registry's Location header is outside input: one that is no URL at all gives an
    ImageError naming it (it used to escape as a bare ValueError)."""
    with pytest.raises(ImageError, match=r"redirected to an invalid URL 'http://\[bad/blob'"):
        _pull("http://[bad/blob")


def test_a_token_server_answer_is_read_up_to_the_manifest_limit_only() -> None:
    """The token server is outside input like the registry: an endless (or huge) answer must
    not be read whole into memory. Past ``max_manifest_bytes`` the client stops with an
    ImageError naming the realm (it used to read all of it)."""
    sent = [0]

    def endless() -> Iterator[bytes]:
        yield b'{"token": "t"}'
        while sent[0] < 64 << 20:  # 64 MiB of JSON whitespace: valid, and far too much
            sent[0] += 1 << 20
            yield b" " * (1 << 20)

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/token":
            return httpx.Response(200, stream=_Gen(endless()))
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example/token"'}
        )

    config = BuilderConfig(max_manifest_bytes=1 << 20)
    client = RegistryClient(config, transport=httpx.MockTransport(handler))
    with client, pytest.raises(ImageError, match=r"token server https://auth.example/token: "):
        client.get_manifest(Reference.parse("reg.example/app:latest"))
    assert sent[0] <= 4 << 20  # stopped soon after the limit, not at the end


class _Gen(httpx.SyncByteStream):
    def __init__(self, it: Iterator[bytes]) -> None:
        self._it = it

    def __iter__(self) -> Iterator[bytes]:
        yield from self._it
