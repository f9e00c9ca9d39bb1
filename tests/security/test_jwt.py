"""JWT attacks not covered by tests/cli (expired, bad signature, alg none, audience, missing exp,
tenant mismatch are there) nor tests/gateway (ES256 wrong key): wrong/missing issuer, missing
audience, not-yet-valid tokens, and RS256 key confusion (an HS256 token whose HMAC key is the
gateway's public key PEM, and alg none against an RS-configured gateway)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from unkey_deploy.core.clock import FakeClock
from unkey_deploy.core.config import GatewayConfig
from unkey_deploy.core.errors import Unauthenticated
from unkey_deploy.gateway.auth import Authenticator
from unkey_deploy.gateway.tls import client_context
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db
from unkey_deploy.testing.gateway import RunningGateway, new_customer


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built by hand (PyJWT refuses to HMAC with a PEM key, an attacker does not)."""
    signing = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    sig = b"" if hmac_key is None else hmac.new(hmac_key, signing.encode(), hashlib.sha256).digest()
    return signing + "." + _b64(sig)


@pytest.fixture
def rs_auth(
    tmp_path: Path,
) -> Iterator[tuple[Authenticator, rsa.RSAPrivateKey, bytes, cp.Customer]]:
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub = tmp_path / "jwt.pub"
    pub.write_bytes(pem)
    engine = db.make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    db.upgrade(engine)
    factory = db.session_factory(engine)
    with db.transaction(factory) as s:
        c = cp.create_customer(s, "rs-co", now=1.0)
    yield Authenticator(GatewayConfig(jwt_public_key_file=pub), factory, FakeClock()), priv, pem, c
    engine.dispose()


def _claims(c: cp.Customer, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": c.id,
        "tenant_id": c.tenant_id,
        "iss": "unkey-deploy",
        "aud": "unkey-deploy",
        "exp": int(time.time()) + 60,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_rs256_accepts_its_key_and_refuses_key_confusion(
    rs_auth: tuple[Authenticator, rsa.RSAPrivateKey, bytes, cp.Customer],
) -> None:
    auth, priv, pem, c = rs_auth
    assert auth.verify_jwt(jwt.encode(_claims(c), priv, algorithm="RS256")).customer_id == c.id
    # HS256 with the public key PEM as the HMAC secret: the classic RS/HS confusion.
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.verify_jwt(_forge({"alg": "HS256", "typ": "JWT"}, _claims(c), pem))
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.verify_jwt(_forge({"alg": "none", "typ": "JWT"}, _claims(c), None))
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.verify_jwt(_forge({"alg": "None", "typ": "JWT"}, _claims(c), None))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.verify_jwt(jwt.encode(_claims(c), other, algorithm="RS256"))
    with pytest.raises(Unauthenticated, match="expired"):
        auth.verify_jwt(jwt.encode(_claims(c, exp=int(time.time()) - 120), priv, algorithm="RS256"))
    # A valid signature over claims then tampered with (customer swapped) fails.
    good = jwt.encode(_claims(c), priv, algorithm="RS256")
    head, _, sig = good.split(".")
    tampered = head + "." + _b64(json.dumps(_claims(c, sub="cust_other")).encode()) + "." + sig
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.verify_jwt(tampered)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"iss": "someone-else"}, "issuer"),
        ({"iss": None}, "iss"),
        ({"aud": None}, "aud"),
        ({"aud": ["other-service"]}, "audience"),
        ({"nbf": int(time.time()) + 3600}, "not yet valid"),
        ({"iat": int(time.time()) + 3600}, "iat"),
    ],
)
def test_rs256_claim_checks(
    rs_auth: tuple[Authenticator, rsa.RSAPrivateKey, bytes, cp.Customer],
    change: dict[str, Any],
    why: str,
) -> None:
    auth, priv, _, c = rs_auth
    with pytest.raises(Unauthenticated, match="invalid token") as info:
        auth.verify_jwt(jwt.encode(_claims(c, **change), priv, algorithm="RS256"))
    assert why in str(info.value).lower()


def test_wrong_issuer_and_forged_tokens_over_https(
    gateway: RunningGateway, jwt_secret: str
) -> None:
    c = new_customer(gateway)
    claims = {"sub": c.id, "tenant_id": c.tenant_id, "aud": "unkey-deploy",
              "exp": int(time.time()) + 60}  # fmt: skip
    tokens = {
        "ok": jwt.encode({**claims, "iss": "unkey-deploy"}, jwt_secret, algorithm="HS256"),
        "issuer": jwt.encode({**claims, "iss": "evil"}, jwt_secret, algorithm="HS256"),
        "none": _forge({"alg": "none"}, {**claims, "iss": "unkey-deploy"}, None),
        "hs512": jwt.encode({**claims, "iss": "unkey-deploy"}, jwt_secret * 2, algorithm="HS512"),
    }
    with httpx.Client(base_url=gateway.url, verify=client_context(gateway.ca_cert)) as h:
        codes = {
            name: h.get("/v1/whoami", headers={"Authorization": f"Bearer {t}"})
            for name, t in tokens.items()
        }
    assert codes["ok"].status_code == 200 and codes["ok"].json()["customer_id"] == c.id
    for name in ("issuer", "none", "hs512"):
        r = codes[name]
        assert r.status_code == 401, (name, r.text)
        assert r.json()["error"]["code"] == "unauthenticated"
        assert c.id not in r.text
