"""API keys are never written in plain text: not in gatewayd's logs, not in its data directory
(control-plane SQLite database with its WAL, chDB files, anything else), only their SHA-256."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from secrets import token_hex

import httpx
import jwt

from unkey_deploy.gateway.tls import client_context
from unkey_deploy.store.controlplane import parse_api_key
from unkey_deploy.testing.gateway import new_customer, run_unkey, running_gateway

WINDOW = 16  # no 16-character run of a secret may appear anywhere (a 4-char hint is fine)


def _windows(secret: str) -> set[bytes]:
    return {secret[i : i + WINDOW].encode() for i in range(len(secret) - WINDOW + 1)}


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_keys_and_tokens_never_reach_logs_or_disk(tmp_path: Path, jwt_secret: str) -> None:
    data = tmp_path / "gw"
    hidden: list[str] = []  # the secret part of every key, good or bad, and whole tokens
    with running_gateway(data, jwt_secret=jwt_secret) as gw:
        a = new_customer(gw)
        with gw.client(a.key) as ca:
            extra = ca.create_key("second")["secret"]
            ca.deploy(
                {"name": "k", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "128MiB"}}
            )
        made = run_unkey(gw, "keys", "create", "--json", api_key=a.key)
        assert made.code == 0, made
        cli_key = json.loads(made.out)["secret"]
        good = [a.key, extra, cli_key]
        for key in good:
            parsed = parse_api_key(key)
            assert parsed is not None
            hidden.append(parsed[1])
        a_key_id = "key_" + a.key.split("_")[1]
        wrong, unknown, junk = token_hex(24), token_hex(24), token_hex(30)
        bad = [
            f"uk_{a_key_id[4:]}_{wrong}",  # right key id, wrong secret
            "uk_" + "Z" * 26 + "_" + unknown,  # unknown key id
            "uk_malformed_" + junk,
        ]
        hidden += [wrong, unknown, junk]
        token = jwt.encode(
            {"sub": a.id, "tenant_id": a.tenant_id, "iss": "unkey-deploy",
             "aud": "unkey-deploy", "exp": int(time.time()) + 60},
            jwt_secret, algorithm="HS256",
        )  # fmt: skip
        hidden += [token.split(".")[2], jwt_secret]
        with httpx.Client(base_url=gw.url, verify=client_context(gw.ca_cert)) as h:
            for cred in [*good, *bad, token, token + "x"]:
                for path in ("/v1/whoami", "/v1/deployments", "/v1/customers"):
                    h.get(path, headers={"Authorization": f"Bearer {cred}"})
            assert h.get("/v1/whoami", headers={"Authorization": f"Bearer {a.key}"}).is_success
            assert (
                h.get("/v1/whoami", headers={"Authorization": f"Bearer {bad[0]}"}).status_code
                == 401
            )
        # Revoking goes through the same paths.
        with gw.client(a.key) as ca:
            ca.revoke_key("key_" + extra.split("_")[1])
        db_file = Path(gw.database_url.removeprefix("sqlite:///"))
    # gatewayd is stopped: everything it wrote is on disk.
    assert gw.log_file.stat().st_size > 0
    log = gw.log_file.read_text()
    assert a.id in log  # the log really records these requests
    needles = {w: s for s in hidden for w in _windows(s)}
    for f in _files(data):
        if f.parent.name == "tls":
            continue
        blob = f.read_bytes()
        for needle, s in needles.items():
            assert needle not in blob, f"{f} holds part of secret {s[:6]}..."
    # The database holds exactly the SHA-256 of each good key's secret.
    with sqlite3.connect(db_file) as conn:
        stored = dict(conn.execute("SELECT id, secret_hash FROM api_keys").fetchall())
    for key in good:
        parsed = parse_api_key(key)
        assert parsed is not None
        assert stored[parsed[0]] == hashlib.sha256(parsed[1].encode()).hexdigest()
