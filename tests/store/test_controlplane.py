"""Control-plane records against SQLite and PostgreSQL (through the Alembic migrations)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from unkey_deploy.core.errors import Conflict, IllegalTransition, InvalidInput, NotFound
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db

SPEC = {"name": "web", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "256MiB"}}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'control.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = db.make_engine(url)
    db.upgrade(engine)
    yield db.session_factory(engine)
    engine.dispose()


def _name() -> str:
    # The PostgreSQL database is shared by the tests of a worker: every test uses fresh names.
    return f"acme-{uuid.uuid4().hex[:10]}"


def test_migration_creates_the_tables(factory: sessionmaker[Session]) -> None:
    with factory() as s:
        tables = set(inspect(s.get_bind()).get_table_names())
    assert {
        "tenants",
        "customers",
        "api_keys",
        "deployments",
        "deployment_events",
        "idempotency_records",
    } <= tables


def test_customer_money_is_exact(factory: sessionmaker[Session]) -> None:
    with db.transaction(factory) as s:
        c = cp.create_customer(s, _name(), now=1.0)
    assert c.pricing_tier == "standard" and c.discount_pct == 0 and c.credit_balance == 0
    with db.transaction(factory) as s:
        cp.update_customer(
            s,
            c.id,
            now=2.0,
            pricing_tier="pro",
            discount_pct=Decimal("12.50"),
            credit_balance=Decimal("10.000001"),
        )
        cp.update_customer(s, c.id, now=3.0, add_credits=Decimal("0.000002"))
    with factory() as s:
        got = cp.get_customer(s, c.id)
    assert got.pricing_tier == "pro"
    assert got.discount_pct == Decimal("12.50")
    assert got.credit_balance == Decimal("10.000003")
    assert isinstance(got.credit_balance, Decimal)
    with db.transaction(factory) as s, pytest.raises(InvalidInput, match="tier"):
        cp.update_customer(s, c.id, now=4.0, pricing_tier="platinum")
    with db.transaction(factory) as s, pytest.raises(InvalidInput, match="between 0 and 100"):
        cp.update_customer(s, c.id, now=4.0, discount_pct=Decimal("101"))


def test_tenant_name_is_unique(factory: sessionmaker[Session]) -> None:
    name = _name()
    with db.transaction(factory) as s:
        first = cp.create_customer(s, name, now=1.0)
    with db.transaction(factory) as s, pytest.raises(Conflict):
        cp.create_customer(s, name, now=1.0)
    with db.transaction(factory) as s:
        second = cp.create_customer(s, "billing team", now=1.0, tenant_id=first.tenant_id)
    assert second.tenant_id == first.tenant_id


def test_api_key_is_stored_hashed_and_revocable(factory: sessionmaker[Session]) -> None:
    with db.transaction(factory) as s:
        c = cp.create_customer(s, _name(), now=1.0)
        key, plaintext = cp.create_api_key(s, c.id, now=1.0, name="ci")
    parsed = cp.parse_api_key(plaintext)
    assert parsed is not None and parsed[0] == key.id
    with factory() as s:
        stored = cp.find_api_key(s, key.id)
        assert stored is not None
        raw_row = s.get(cp.ApiKeyRow, key.id)
        assert raw_row is not None and parsed[1] not in raw_row.secret_hash
    assert stored.matches(parsed[1]) and not stored.matches("0" * 48)
    assert plaintext not in repr(stored)
    other = _name()
    with db.transaction(factory) as s:
        c2 = cp.create_customer(s, other, now=1.0)
    with db.transaction(factory) as s, pytest.raises(NotFound):
        cp.revoke_api_key(s, key.id, customer_id=c2.id, now=2.0)
    with db.transaction(factory) as s:
        revoked = cp.revoke_api_key(s, key.id, customer_id=c.id, now=2.0)
    assert revoked.revoked_at == 2.0
    assert cp.parse_api_key("uk_short_abc") is None


def test_deployment_lifecycle_events_and_tenant_scope(factory: sessionmaker[Session]) -> None:
    with db.transaction(factory) as s:
        c = cp.create_customer(s, _name(), now=1.0)
        other = cp.create_customer(s, _name(), now=1.0)
        dep = cp.create_deployment(
            s, tenant_id=c.tenant_id, customer_id=c.id, request_id="req_x", spec=SPEC, now=1.0
        )
    assert dep.state == "accepted" and dep.spec == SPEC
    with factory() as s:
        assert cp.get_deployment(s, dep.id, tenant_id=c.tenant_id).id == dep.id
        with pytest.raises(NotFound):
            cp.get_deployment(s, dep.id, tenant_id=other.tenant_id)
        assert cp.list_deployments(s, tenant_id=other.tenant_id) == []
        assert [d.id for d in cp.list_deployments(s, tenant_id=c.tenant_id)] == [dep.id]

    records = cp.DeploymentRecords(factory)
    records.set_state(dep.id, "building")
    records.event(dep.id, "build", "pulling nginx:1.27", layer=1)
    with pytest.raises(IllegalTransition, match="building to stopped"):
        records.set_state(dep.id, "stopped")
    records.set_state(dep.id, "deploying", asset_id="ast_1")
    records.set_state(dep.id, "running", url="http://10.0.0.2:80")
    got = records.get(dep.id)
    assert (got.state, got.url, got.asset_id) == ("running", "http://10.0.0.2:80", "ast_1")

    with factory() as s:
        events = cp.events_after(s, dep.id)
        assert [e.phase for e in events] == ["accepted", "state", "build", "state", "state"]
        assert events[2].data == {"layer": 1}
        assert [e.id for e in cp.events_after(s, dep.id, events[2].id)] == [
            e.id for e in events[3:]
        ]


def test_idempotency_record_is_unique_per_customer(factory: sessionmaker[Session]) -> None:
    with db.transaction(factory) as s:
        c = cp.create_customer(s, _name(), now=1.0)
        cp.put_idempotency(
            s, c.id, "k1", request_hash="h", status_code=202, response={"a": 1}, now=1.0
        )
    with factory() as s:
        rec = cp.get_idempotency(s, c.id, "k1")
        assert rec is not None and rec.response == {"a": 1} and rec.status_code == 202
        assert cp.get_idempotency(s, c.id, "k2") is None
    with pytest.raises(IntegrityError), db.transaction(factory) as s:
        cp.put_idempotency(s, c.id, "k1", request_hash="h2", status_code=202, response={}, now=2.0)
