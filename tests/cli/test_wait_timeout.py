"""`--wait --timeout S` gives up after S seconds even when the deployment's event stream is
silent (no deployer is at work here, so nothing ever happens to the deployment)."""

from __future__ import annotations

import time
from pathlib import Path

from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db
from unkey_deploy.testing.gateway import RunningGateway, new_customer
from unkey_deploy.testing.gateway import run_unkey as unkey


def test_deploy_wait_gives_up_at_its_timeout_on_a_silent_stream(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    c = new_customer(gateway)
    app = tmp_path / "silent.yaml"
    app.write_text("name: silent\nimage: ghcr.io/acme/silent:1.0\n"
                   "resources:\n  cpu: 1\n  memory: 128MiB\n")  # fmt: skip
    t0 = time.monotonic()
    res = unkey(gateway, "deploy", "--wait", "--timeout", "2", str(app), api_key=c.key)
    took = time.monotonic() - t0
    assert res.code == 8, res.err  # DeadlineExceeded
    assert "did not finish within 2 s" in res.err
    assert took < 20, took  # not the next keep-alive, event or the subprocess' own timeout


def test_stop_wait_gives_up_at_its_timeout_on_a_silent_stream(gateway: RunningGateway) -> None:
    c = new_customer(gateway)
    with gateway.client(c.key) as client:
        dep_id = client.deploy(
            {"name": "stuck", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "128MiB"}}
        )["deployment"]["id"]
    engine = db.make_engine(gateway.database_url)
    try:
        records = cp.DeploymentRecords(db.session_factory(engine))
        for state in ("building", "deploying", "running"):
            records.set_state(dep_id, state)
    finally:
        engine.dispose()
    t0 = time.monotonic()
    res = unkey(gateway, "deployments", "stop", "--wait", "--timeout", "2", dep_id, api_key=c.key)
    took = time.monotonic() - t0
    assert res.code == 8, res.err
    assert "did not finish within 2 s" in res.err
    assert took < 20, took


def test_logs_follow_refuses_an_interval_it_cannot_sleep(gateway: RunningGateway) -> None:
    """``--interval -1`` (or 0, a busy loop against the rate limit) is a usage error naming the
    option, not a ValueError traceback from time.sleep."""
    c = new_customer(gateway)
    with gateway.client(c.key) as client:
        dep_id = client.deploy(
            {"name": "quiet", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "128MiB"}}
        )["deployment"]["id"]
    for interval in ("-1", "0"):
        res = unkey(gateway, "logs", dep_id, "--no-build", "--follow", "--interval", interval,
                    api_key=c.key)  # fmt: skip
        assert res.code == 2, res.err
        assert "Traceback" not in res.err and "--interval" in res.err
