"""gatewayd serving other machines (``--host`` a NIC address) with the self-signed certificate
it makes on first start: the certificate names that address, so a client trusting it (the CLI
with UNKEY_CA_CERT) verifies the connection."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from unkey_deploy.core.net import free_port
from unkey_deploy.gateway.tls import client_context


def test_the_generated_certificate_names_the_address_gatewayd_listens_on(tmp_path: Path) -> None:
    host = "127.0.0.2"  # a loopback address the certificate's fixed names do not cover
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_")}
    env["UNKEY_DATABASE_URL"] = f"sqlite:///{tmp_path / 'control.db'}"
    log = (tmp_path / "gatewayd.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "unkey_deploy.cli.main", "gatewayd", "--data-dir", str(tmp_path),
         "--host", host, "--port", str(port)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        cert = tmp_path / "tls" / "gateway.crt"
        deadline = time.monotonic() + 60
        while not cert.exists() or proc.poll() is not None:
            assert proc.poll() is None, (tmp_path / "gatewayd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "gatewayd made no certificate"
            time.sleep(0.1)
        url = f"https://{host}:{port}/healthz"
        error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(url, verify=client_context(cert), timeout=2)
                break
            except httpx.ConnectError as exc:  # not listening yet, or the name check failed
                error = exc
                time.sleep(0.2)
        else:
            raise AssertionError(f"no verified connection to {url}: {error}")
        assert r.status_code == 200 and r.json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
