"""The real `unkey` CLI against a real gatewayd over HTTPS."""

from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path

import httpx
import jwt
import pytest

from unkey_deploy.core.errors import RateLimited, ValidationFailed
from unkey_deploy.gateway.tls import client_context
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db, jobs
from unkey_deploy.testing.deploys import DeployDriver, Drive
from unkey_deploy.testing.gateway import UNKEY, RunningGateway, new_customer
from unkey_deploy.testing.gateway import TestCustomer as Customer
from unkey_deploy.testing.gateway import run_unkey as unkey

JWT_SECRET = "test-secret-" + "x" * 32  # the gateway fixture's (tests/cli/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "app.yaml"


def _write_app(tmp_path: Path, name: str = "web", cpu: int = 1) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        f"name: {name}\nimage: ghcr.io/acme/{name}:1.0\nresources:\n  cpu: {cpu}\n"
        "  memory: 512MiB\nport: 8080\nenv:\n  MODE: prod\n"
    )
    return p


def test_customer_create_and_deploy_is_accepted_and_enqueued(gateway: RunningGateway) -> None:
    r = unkey(gateway, "customers", "create", "acme-deploy", "--credits", "12.500001", "--json")
    assert r.code == 0, r.err
    created = json.loads(r.out)
    assert created["customer"]["credit_balance"] == "12.500001"
    key = created["secret"]
    assert key.startswith("uk_")

    r = unkey(gateway, "deploy", str(EXAMPLE), "--json", api_key=key)
    assert r.code == 0, r.err
    dep = json.loads(r.out)
    assert dep["state"] == "accepted" and dep["name"] == "hello-web"
    assert dep["customer_id"] == created["customer"]["id"]
    assert dep["request_id"].startswith("req_") and dep["job_id"]
    assert "accepted" in r.err

    r = unkey(gateway, "deployments", "ls", "--json", api_key=key)
    assert r.code == 0 and [d["id"] for d in json.loads(r.out)] == [dep["id"]]
    r = unkey(gateway, "deployments", "show", dep["id"], api_key=key)
    assert r.code == 0 and dep["id"] in r.out and "accepted" in r.out

    # The route decision: a deploy job carrying the enriched request.
    engine = db.make_engine(gateway.database_url)
    with db.session_factory(engine)() as s:
        job = jobs.get(s, dep["job_id"])
    engine.dispose()
    assert job.kind == "deploy" and job.state == jobs.JobState.QUEUED
    p = job.payload
    assert p["deployment_id"] == dep["id"] and p["tenant_id"] == created["customer"]["tenant_id"]
    assert (
        p["memory_bytes"] == 256 * 1024**2
        and p["vcpus"] == 1
        and p["request_id"] == dep["request_id"]
    )


def test_wrong_key_is_401_exit_3(gateway: RunningGateway) -> None:
    bogus = "uk_" + "0" * 26 + "_" + "f" * 48
    r = unkey(gateway, "deployments", "ls", api_key=bogus)
    assert r.code == 3
    assert "invalid API key" in r.err and "hint" in r.err
    r = unkey(gateway, "deployments", "ls", api_key="not-a-key")
    assert r.code == 3 and "unrecognized credentials" in r.err
    with httpx.Client(verify=client_context(gateway.ca_cert)) as h:
        resp = h.get(gateway.url + "/v1/deployments", headers={"Authorization": f"Bearer {bogus}"})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthenticated"
    assert resp.json()["request_id"] == resp.headers["x-request-id"]


def test_other_tenants_deployment_is_404(gateway: RunningGateway, tmp_path: Path) -> None:
    a, b = new_customer(gateway), new_customer(gateway)
    r = unkey(gateway, "deploy", str(_write_app(tmp_path)), api_key=a.key)
    assert r.code == 0, r.err
    dep_id = r.out.strip()
    r = unkey(gateway, "deployments", "show", dep_id, api_key=b.key)
    assert r.code == 4 and "not found" in r.err
    r = unkey(gateway, "deployments", "ls", "--json", api_key=b.key)
    assert r.code == 0 and json.loads(r.out) == []
    # Control: the owner sees it.
    assert unkey(gateway, "deployments", "show", dep_id, api_key=a.key).code == 0


def test_malformed_body_is_422_naming_the_field(gateway: RunningGateway, tmp_path: Path) -> None:
    c = new_customer(gateway)
    bad = {"name": "web", "image": "nginx", "resources": {"cpu": 99, "memory": "1XB"}, "x": 1}
    with gateway.client(c.key) as client, pytest.raises(ValidationFailed) as info:
        client.deploy(bad)
    locs = {p.loc: p.msg for p in info.value.problems}
    assert set(locs) == {"resources.cpu", "resources.memory", "x"}
    assert "must be <= 32" in locs["resources.cpu"]
    with httpx.Client(verify=client_context(gateway.ca_cert)) as h:
        resp = h.post(
            gateway.url + "/v1/deploy",
            content=b"{not json",
            headers={"Authorization": f"Bearer {c.key}", "Content-Type": "application/json"},
        )
    assert resp.status_code == 422
    assert "not valid JSON" in resp.json()["error"]["problems"][0]["msg"]
    # The CLI refuses the same mistake before sending, with line and column.
    r = unkey(gateway, "deploy", str(_write_app(tmp_path, cpu=99)), api_key=c.key)
    assert r.code == 2 and ":4:8: resources.cpu: must be <= 32" in r.err


def test_same_idempotency_key_replays_the_first_result(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    c = new_customer(gateway)
    app = _write_app(tmp_path)
    first = unkey(gateway, "deploy", str(app), "--json", "--idempotency-key", "k-1", api_key=c.key)
    again = unkey(gateway, "deploy", str(app), "--json", "--idempotency-key", "k-1", api_key=c.key)
    assert first.code == 0 and again.code == 0, first.err + again.err
    assert json.loads(first.out) == json.loads(again.out)
    r = unkey(gateway, "deployments", "ls", "--json", api_key=c.key)
    assert len(json.loads(r.out)) == 1
    changed = _write_app(tmp_path, name="other")
    r = unkey(gateway, "deploy", str(changed), "--idempotency-key", "k-1", api_key=c.key)
    assert r.code == 5 and "different body" in r.err
    # Without a key, each deploy is a new deployment.
    assert unkey(gateway, "deploy", str(app), api_key=c.key).code == 0
    assert len(json.loads(unkey(gateway, "deployments", "ls", "--json", api_key=c.key).out)) == 2


def test_rate_limit_is_429_with_retry_after(gateway: RunningGateway) -> None:
    c = new_customer(gateway)
    other = new_customer(gateway)
    statuses = []
    with httpx.Client(verify=client_context(gateway.ca_cert)) as h:
        for _ in range(20):
            resp = h.get(
                gateway.url + "/v1/deployments", headers={"Authorization": f"Bearer {c.key}"}
            )
            statuses.append(resp.status_code)
            if resp.status_code == 429:
                break
    assert statuses[0] == 200 and statuses[-1] == 429
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["code"] == "rate_limited"
    with gateway.client(c.key) as client, pytest.raises(RateLimited) as info:
        client.list_deployments()
    assert info.value.retry_after > 0
    r = unkey(gateway, "deployments", "ls", api_key=c.key)
    assert r.code == 6 and "rate limit" in r.err and "retry after" in r.err
    # Buckets are per key: another customer is unaffected.
    assert unkey(gateway, "deployments", "ls", api_key=other.key).code == 0


def test_keys_create_list_revoke(gateway: RunningGateway) -> None:
    c = new_customer(gateway)
    r = unkey(gateway, "keys", "create", "--name", "ci", api_key=c.key)
    assert r.code == 0, r.err
    second = r.out.strip()
    assert second.startswith("uk_") and "not shown again" in r.err
    r = unkey(gateway, "keys", "ls", "--json", api_key=second)
    listed = json.loads(r.out)
    assert {k["name"] for k in listed} == {"default", "ci"}
    assert second not in r.out  # secrets are never listed
    ci_id = next(k["id"] for k in listed if k["name"] == "ci")
    assert unkey(gateway, "keys", "revoke", ci_id, api_key=c.key).code == 0
    r = unkey(gateway, "deployments", "ls", api_key=second)
    assert r.code == 3 and "revoked" in r.err
    assert unkey(gateway, "deployments", "ls", api_key=c.key).code == 0
    # Another customer cannot revoke (or see) this key.
    other = new_customer(gateway)
    assert unkey(gateway, "keys", "revoke", c.key.split("_")[1], api_key=other.key).code == 4


def _jwt(c: Customer, **over: object) -> str:
    claims: dict[str, object] = {
        "customer_id": c.id,
        "tenant_id": c.tenant_id,
        "iss": "unkey-deploy",
        "aud": "unkey-deploy",
        "exp": int(time.time()) + 300,
    }
    claims.update(over)
    key = str(claims.pop("_key", JWT_SECRET))
    alg = str(claims.pop("_alg", "HS256"))
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=alg)


def test_jwt_good_expired_bad_signature_alg_none(gateway: RunningGateway) -> None:
    c = new_customer(gateway)
    r = unkey(gateway, "whoami", "--json", api_key=_jwt(c))
    assert r.code == 0, r.err
    assert json.loads(r.out)["customer_id"] == c.id and json.loads(r.out)["method"] == "jwt"

    r = unkey(gateway, "whoami", api_key=_jwt(c, exp=int(time.time()) - 3600))
    assert r.code == 3 and "expired" in r.err
    r = unkey(gateway, "whoami", api_key=_jwt(c, _key="another-secret-" + "y" * 32))
    assert r.code == 3 and "invalid token" in r.err
    unsigned = jwt.encode(
        {"customer_id": c.id, "tenant_id": c.tenant_id, "iss": "unkey-deploy",
         "aud": "unkey-deploy", "exp": int(time.time()) + 300},
        None, algorithm="none",
    )  # fmt: skip
    r = unkey(gateway, "whoami", api_key=unsigned)
    assert r.code == 3 and "invalid token" in r.err
    r = unkey(gateway, "whoami", api_key=_jwt(c, aud="someone-else"))
    assert r.code == 3
    r = unkey(gateway, "whoami", api_key=_jwt(c, exp=None))
    assert r.code == 3 and "exp" in r.err
    other = new_customer(gateway)
    r = unkey(gateway, "whoami", api_key=_jwt(c, tenant_id=other.tenant_id))
    assert r.code == 3 and "unknown customer or tenant" in r.err


def test_login_writes_0600_config_and_never_prompts_without_tty(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    c = new_customer(gateway)
    home = tmp_path / "cfg"
    env = {"UNKEY_CONFIG_HOME": str(home)}
    r = unkey(gateway, "login", **env)
    assert r.code == 2 and "not a terminal" in r.err
    r = unkey(gateway, "login", "--api-key", c.key, **env)
    assert r.code == 0, r.err
    cfg = home / "config.json"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert json.loads(cfg.read_text())["api_key"] == c.key
    # Later commands use the saved key (no UNKEY_API_KEY in the environment).
    r = unkey(gateway, "whoami", "--json", **env)
    assert r.code == 0 and json.loads(r.out)["customer_id"] == c.id
    r = unkey(gateway, "login", "--api-key", "uk_bad", **env)
    assert r.code == 3


def test_customers_update_sets_tier_discount_credits(gateway: RunningGateway) -> None:
    c = new_customer(gateway)
    r = unkey(
        gateway, "customers", "update", c.id, "--tier", "pro", "--discount", "12.5",
        "--credits", "100.000001", "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    got = json.loads(r.out)
    assert (got["pricing_tier"], got["discount_pct"], got["credit_balance"]) == (
        "pro", "12.50", "100.000001",
    )  # fmt: skip
    r = unkey(gateway, "customers", "update", c.id, "--add-credits", "-0.000001", "--json")
    assert json.loads(r.out)["credit_balance"] == "100.000000"
    r = unkey(gateway, "customers", "update", c.id, "--tier", "gold")
    assert r.code == 2 and "unknown pricing tier" in r.err
    r = unkey(gateway, "customers", "update", c.id, "--tier", "pro", UNKEY_ADMIN_TOKEN="wrong")
    assert r.code == 3


def _deploy_and_drive(
    gateway: RunningGateway, drive_deploy: DeployDriver, c: Customer, app: Path, drive: Drive
) -> tuple[int, str, str]:
    """Run `unkey deploy --wait --json` and, once its deployment exists, ``drive`` it."""
    proc = subprocess.Popen(
        [str(UNKEY), "deploy", str(app), "--wait", "--json"],
        env=gateway.cli_env(c.key),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _dep_id, out, err = drive_deploy(proc, c, drive)
    return proc.returncode, out, err


def test_deploy_wait_follows_the_event_stream(
    gateway: RunningGateway, drive_deploy: DeployDriver, tmp_path: Path
) -> None:
    c = new_customer(gateway)

    def drive(records: cp.DeploymentRecords, dep_id: str) -> None:
        records.set_state(dep_id, "building")
        records.event(dep_id, "build", "pulling ghcr.io/acme/waiter:1.0")
        records.set_state(dep_id, "deploying", asset_id="ast_x")
        records.set_state(dep_id, "running", url="http://10.1.0.2:8080")

    app = _write_app(tmp_path, name="waiter")
    code, out, err = _deploy_and_drive(gateway, drive_deploy, c, app, drive)
    assert code == 0, err
    assert "pulling ghcr.io/acme/waiter:1.0" in err and " is running" in err
    dep = json.loads(out)
    assert dep["state"] == "running" and dep["url"] == "http://10.1.0.2:8080"


def test_deploy_wait_fails_when_the_deployment_is_stopped_before_it_runs(
    gateway: RunningGateway, drive_deploy: DeployDriver, tmp_path: Path
) -> None:
    c = new_customer(gateway)

    def drive(records: cp.DeploymentRecords, dep_id: str) -> None:
        records.set_state(dep_id, "building")
        records.set_state(dep_id, "deploying", asset_id="ast_x")
        records.set_state(dep_id, "stopping")
        records.event(dep_id, "stop", "stop requested")
        records.set_state(dep_id, "stopped")

    app = _write_app(tmp_path, name="stopped-early")
    code, out, err = _deploy_and_drive(gateway, drive_deploy, c, app, drive)
    assert code == 5, err  # Conflict: the deploy did not end running
    assert "was stopped before it ran" in err and "unkey deployments show" in err
    assert out == ""  # no URL, no deployment printed as if it had worked


def test_deploy_wait_reports_failure_with_its_exit_code(
    gateway: RunningGateway, drive_deploy: DeployDriver, tmp_path: Path
) -> None:
    c = new_customer(gateway)
    error = {"code": "image_error", "message": "manifest unknown", "retryable": False}

    def drive(records: cp.DeploymentRecords, dep_id: str) -> None:
        records.set_state(dep_id, "building")
        records.set_state(dep_id, "failed", error=error)

    app = _write_app(tmp_path, name="broken")
    code, _out, err = _deploy_and_drive(gateway, drive_deploy, c, app, drive)
    assert code == 10, err  # ImageError's exit code
    assert "manifest unknown" in err
    with gateway.client(c.key) as client:
        dep_id = client.list_deployments()["deployments"][0]["id"]
        events = list(client.events(dep_id))
    assert [e.event for e in events] == ["accepted", "state", "state", "end"]
    assert events[-1].data["state"] == "failed"
    assert events[-1].data["error"]["code"] == "image_error"
