"""A real gatewayd hosting the billing service whose aggregator consumes a real nats-server, so
usage imported with ``unkey usage import`` (billaged -> JetStream -> aggregator -> chDB) shows up
in the dashboard. ``testing.gateway.running_gateway`` cannot pass a NATS URL, hence this launcher.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from unkey_deploy.bus.server import NatsServer
from unkey_deploy.gateway.tls import client_context, ensure_self_signed
from unkey_deploy.testing.gateway import RunningGateway, free_port
from unkey_deploy.testing.nats import running_nats


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with running_nats(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def billing_gateway(tmp_path: Path, nats_server: NatsServer) -> Iterator[RunningGateway]:
    data_dir = tmp_path / "gw"
    data_dir.mkdir()
    cert, key = data_dir / "tls" / "gateway.crt", data_dir / "tls" / "gateway.key"
    ensure_self_signed(cert, key)
    admin = "ukadm_" + secrets.token_hex(16)
    port = free_port()
    db_url = f"sqlite:///{(data_dir / 'control.db').resolve()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_")}
    env.update(
        UNKEY_GATEWAY__ADMIN_TOKEN=admin,
        UNKEY_DATABASE_URL=db_url,
        UNKEY_BUS__NATS_URL=nats_server.url,
    )
    log_file = data_dir / "gatewayd.log"
    argv = [sys.executable, "-m", "unkey_deploy.cli.main", "gatewayd"]
    argv += ["--data-dir", str(data_dir), "--port", str(port)]
    with open(log_file, "ab") as fh:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gatewayd exited: {log_file.read_text()[-2000:]}")
            try:
                r = httpx.get(url + "/healthz", verify=client_context(cert), timeout=1)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gatewayd not healthy: {log_file.read_text()[-2000:]}")
            time.sleep(0.1)
        yield RunningGateway(url, cert, admin, data_dir, db_url, log_file, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
