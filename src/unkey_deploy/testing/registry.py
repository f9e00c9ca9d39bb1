"""A real OCI registry for tests: Debian's ``docker-registry`` on 127.0.0.1, optional token auth.

``start_registry(workdir, auth=("user", "pass"))`` starts the registry (own storage dir, free
port) and, with ``auth``, a small token server in front of it: it checks Basic credentials and
issues RS256 JWTs carrying the self-signed certificate in ``x5c`` (the registry trusts it through
``rootcertbundle``), the same flow Docker Hub, GHCR, ECR... use. ``Registry.stop()`` ends both.
The token server records every request (``token_requests``) so tests can see the flow happened.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import secrets
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..core.net import free_port
from ..gateway.tls import self_signed_cert

REGISTRY_BIN = "/usr/bin/docker-registry"
SERVICE = "unkey-test-registry"
ISSUER = "unkey-test-issuer"


def _self_signed() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, self_signed_cert(key, "unkey test token signer", days=1)


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    server: _TokenServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query)
        srv.requests.append(
            {"path": url.path, "query": q, "auth": self.headers.get("Authorization")}
        )
        hdr = self.headers.get("Authorization", "")
        ok = False
        if hdr.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(hdr[6:]).decode().partition(":")
                ok = (user, pw) == srv.creds
            except ValueError:
                ok = False
        if url.path != "/token" or not ok:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        access = []
        for scope in q.get("scope", []):
            for one in scope.split(" "):
                parts = one.split(":")
                if len(parts) == 3 and parts[0] == "repository":
                    access.append(
                        {"type": "repository", "name": parts[1], "actions": parts[2].split(",")}
                    )
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": srv.creds[0],
            "aud": q.get("service", [SERVICE])[0],
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        token = jwt.encode(claims, srv.key, algorithm="RS256", headers={"x5c": [srv.cert_b64]})
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _TokenServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, creds: tuple[str, str], key: rsa.RSAPrivateKey, cert: x509.Certificate
    ) -> None:
        super().__init__(("127.0.0.1", 0), _TokenHandler)
        self.creds = creds
        self.key = key
        self.cert_b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.requests: list[dict[str, Any]] = []


@dataclass
class Registry:
    """A running registry. ``host`` is ``127.0.0.1:PORT`` (use it in image references)."""

    host: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    creds: tuple[str, str] | None = None
    token_server: _TokenServer | None = None
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def token_requests(self) -> list[dict[str, Any]]:
        return list(self.token_server.requests) if self.token_server else []

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"{self.host}/{repo}:{tag}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.token_server is not None:
            self.token_server.shutdown()
            self.token_server.server_close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_registry(
    workdir: Path, *, auth: tuple[str, str] | None = None, timeout_s: float = 15.0
) -> Registry:
    """Start ``docker-registry serve`` on a free loopback port (token auth when ``auth`` is set)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(workdir / "data")},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    token_server = None
    threads: list[threading.Thread] = []
    if auth is not None:
        key, cert = _self_signed()
        bundle = workdir / "token-ca.pem"
        bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        token_server = _TokenServer(auth, key, cert)
        t = threading.Thread(target=token_server.serve_forever, name="token-server", daemon=True)
        t.start()
        threads.append(t)
        cfg["auth"] = {
            "token": {
                "realm": f"http://127.0.0.1:{token_server.server_address[1]}/token",
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(bundle),
            }
        }
    conf = workdir / "config.yml"
    conf.write_text(json.dumps(cfg))  # JSON is YAML
    log = (workdir / "registry.log").open("wb")
    proc = subprocess.Popen(
        [REGISTRY_BIN, "serve", str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
    )
    log.close()
    reg = Registry(f"127.0.0.1:{port}", proc, workdir, auth, token_server, threads)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            reg.stop()
            raise RuntimeError(
                f"docker-registry exited: {(workdir / 'registry.log').read_text()[-2000:]}"
            )
        try:
            r = httpx.get(f"{reg.url}/v2/", timeout=1)
            if r.status_code in (200, 401):
                return reg
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            reg.stop()
            raise RuntimeError("docker-registry did not answer /v2/ in time")
        time.sleep(0.03)
