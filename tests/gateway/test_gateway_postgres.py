"""gatewayd on PostgreSQL: the deploy path that goes through the thread pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from unkey_deploy.store import db, jobs
from unkey_deploy.testing.gateway import new_customer, running_gateway


@pytest.mark.postgres
def test_deploy_and_replay_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    with running_gateway(tmp_path / "gw", database_url=postgres_url) as gw:
        c = new_customer(gw)
        spec = {"name": "pg", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "1GB"}}
        with gw.client(c.key) as client:
            first = client.deploy(spec, idempotency_key="pg-1")
            again = client.deploy(spec, idempotency_key="pg-1")
            listed = client.list_deployments()["deployments"]
        assert first == again
        assert [d["id"] for d in listed] == [first["deployment"]["id"]]
        engine = db.make_engine(postgres_url)
        with db.session_factory(engine)() as s:
            job = jobs.get(s, first["deployment"]["job_id"])
        engine.dispose()
        assert job.payload["deployment_id"] == first["deployment"]["id"]
        assert job.payload["memory_bytes"] == 1_000_000_000
