"""A real gatewayd process for tests: HTTPS on a free 127.0.0.1 port, its own data dir.

    with running_gateway(tmp_path, rate_limit_per_s=1, jwt_secret="s") as gw:
        gw.url, gw.ca_cert, gw.admin_token, gw.database_url, gw.client(api_key=...)

The process is stopped (SIGTERM, then SIGKILL) when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..core.net import free_port
from ..gateway.client import GatewayClient
from ..gateway.tls import client_context, ensure_self_signed


@dataclass(frozen=True)
class RunningGateway:
    url: str
    ca_cert: Path
    admin_token: str
    data_dir: Path
    database_url: str
    log_file: Path
    pid: int

    def client(self, api_key: str | None = None) -> GatewayClient:
        return GatewayClient(
            self.url, api_key=api_key, admin_token=self.admin_token, ca_cert=self.ca_cert
        )

    def cli_env(self, api_key: str | None = None, **extra: str) -> dict[str, str]:
        """Environment for running ``unkey`` against this gateway (no user config leaks in)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("UNKEY_") or k == "UNKEY_TEST_POSTGRES_URL"
        }
        env.update(
            UNKEY_API_URL=self.url,
            UNKEY_CA_CERT=str(self.ca_cert),
            UNKEY_ADMIN_TOKEN=self.admin_token,
            UNKEY_CONFIG_HOME=str(self.data_dir / "cli-config"),
            UNKEY_DATA_DIR=str(self.data_dir / "no-stack"),
            COLUMNS="200",
        )
        if api_key is not None:
            env["UNKEY_API_KEY"] = api_key
        env.update(extra)
        return env


@contextlib.contextmanager
def running_gateway(
    data_dir: Path,
    *,
    rate_limit_per_s: float = 50.0,
    rate_limit_burst: int = 100,
    jwt_secret: str | None = None,
    database_url: str | None = None,
    timeout_s: float = 30.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[RunningGateway]:
    """A real gatewayd over HTTPS on a free 127.0.0.1 port, stopped on exit. ``extra_env`` adds
    ``UNKEY_*`` settings (e.g. ``UNKEY_BUS__NATS_URL`` so its billing service consumes)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cert, key = data_dir / "tls" / "gateway.crt", data_dir / "tls" / "gateway.key"
    ensure_self_signed(cert, key)
    admin = "ukadm_" + secrets.token_hex(16)
    port = free_port()
    db_url = database_url or f"sqlite:///{(data_dir / 'control.db').resolve()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_")}
    env.update(
        UNKEY_GATEWAY__ADMIN_TOKEN=admin,
        UNKEY_GATEWAY__RATE_LIMIT_PER_S=str(rate_limit_per_s),
        UNKEY_GATEWAY__RATE_LIMIT_BURST=str(rate_limit_burst),
        UNKEY_DATABASE_URL=db_url,
    )
    if jwt_secret:
        env["UNKEY_GATEWAY__JWT_SECRET"] = jwt_secret
    env.update(extra_env or {})
    log_file = data_dir / "gatewayd.log"
    argv = [
        sys.executable,
        "-m",
        "unkey_deploy.cli.main",
        "gatewayd",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
    ]
    with open(log_file, "ab") as log_fh:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT, env=env
        )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gatewayd exited: {log_file.read_text()[-2000:]}")
            try:
                if (
                    httpx.get(url + "/healthz", verify=client_context(cert), timeout=1).status_code
                    == 200
                ):
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
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


UNKEY = Path(sys.executable).parent / "unkey"


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def run_unkey(gw: RunningGateway, *args: str, api_key: str | None = None, **env: str) -> CliResult:
    """Run the installed ``unkey`` binary against ``gw`` (stdin is not a TTY)."""
    p = subprocess.run(
        [str(UNKEY), *args],
        env=gw.cli_env(api_key, **env),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return CliResult(p.returncode, p.stdout, p.stderr)


@dataclass(frozen=True)
class TestCustomer:
    id: str
    tenant_id: str
    key: str


def new_customer(gw: RunningGateway) -> TestCustomer:
    """A fresh customer (own tenant) with a first API key, through the admin API."""
    with gw.client() as c:
        res = c.create_customer(f"cust-{secrets.token_hex(5)}")
    return TestCustomer(res["customer"]["id"], res["customer"]["tenant_id"], res["secret"])
