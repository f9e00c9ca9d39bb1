"""The operator's view of the metald hosts through a real gatewayd: ``GET /v1/hosts`` and
``DELETE /v1/hosts/{id}`` (forget a lost host) with the admin token only, and the same through
``unkey hosts ls`` / ``unkey hosts forget``. Hosts and VMs are recorded with metald's own
Scheduler on the gateway's database (no VM boots: a lost host runs nothing anyway)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import sqlalchemy as sa
import zstandard

from unkey_deploy.assets.api import Asset, AssetMeta
from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.core.ids import BuildId, CustomerId
from unkey_deploy.gateway.tls import client_context
from unkey_deploy.metald import models
from unkey_deploy.metald.api import CreateVm, Scheduler, VmState
from unkey_deploy.store.db import make_engine, session_factory
from unkey_deploy.testing.gateway import RunningGateway, new_customer, run_unkey

SPEC = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())
MIB = 1 << 20


@dataclass
class Cluster:
    engine: sa.Engine
    assets: AssetManager
    asset: Asset
    sched: Scheduler
    live: str
    image: Path

    def add_host(self, name: str) -> str:
        host_id = f"host_{name}{secrets.token_hex(4)}"
        now = time.time()
        with self.engine.begin() as c:
            c.execute(
                models.hosts.insert().values(
                    host_id=host_id, name=name, driver="sandbox", cpus=2,
                    memory_bytes=1024 * MIB, capabilities={}, schedulable=True,
                    registered_at=now, heartbeat_at=now,
                )
            )  # fmt: skip
        return host_id

    def beat(self, host_id: str, at: float) -> None:
        with self.engine.begin() as c:
            c.execute(
                models.hosts.update()
                .where(models.hosts.c.host_id == host_id)
                .values(heartbeat_at=at)
            )

    def lost_host(self, name: str) -> tuple[str, str]:
        """A host with one VM of the asset (wanted stopped), then declared lost; returns
        (host id, VM id)."""
        host = self.add_host(name)
        with self.engine.begin() as c:  # the live host takes nothing for a moment
            c.execute(models.hosts.update().where(models.hosts.c.host_id == self.live)
                      .values(schedulable=False))  # fmt: skip
        vm = self.sched.create_vm(CreateVm("dep_img", "cust_a", self.image, memory_bytes=64 * MIB,
                                           asset_id=self.asset.asset_id))  # fmt: skip
        with self.engine.begin() as c:
            c.execute(models.hosts.update().where(models.hosts.c.host_id == self.live)
                      .values(schedulable=True))  # fmt: skip
        assert vm.host_id == host
        self.beat(host, time.time() - 3600)
        self.sched.sweep_lost_hosts()
        assert self.sched.get(vm.vm_id).state == VmState.LOST
        return host, vm.vm_id


@pytest.fixture(scope="module")
def cluster(gateway: RunningGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    engine = make_engine(gateway.database_url)  # migrated by gatewayd
    # the gateway's own blob store (the default one under its data dir)
    store = gateway.data_dir / "assets"
    assets = AssetManager(session_factory(engine), FsBlobStore(store / "blobs"), store / "cache")
    tmp = tmp_path_factory.mktemp("img")
    image = tmp / "rootfs.ext4"
    image.write_bytes(b"\0" * 4096)
    zst = tmp / "rootfs.ext4.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(image.read_bytes()))
    meta = AssetMeta(CustomerId("cust_a"), "test:1", "sha256:" + "0" * 64, BuildId("bld_x"),
                     "key-hosts", 1, 4096, "0" * 64)  # fmt: skip
    asset = assets.register(zst, meta)
    sched = Scheduler(engine, leases=assets)
    cl = Cluster(engine, assets, asset, sched, "", image)
    cl.live = cl.add_host("live-1")
    yield cl
    sched.close()
    engine.dispose()


def _check(route: str, method: str, resp: httpx.Response) -> None:
    """The answer is declared in the checked-in spec and validates against it."""
    declared = SPEC["paths"][route][method.lower()]["responses"].get(str(resp.status_code))
    assert declared is not None, f"{method} {route} answered undeclared {resp.status_code}"
    schema = declared["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": SPEC["components"]}).validate(
        resp.json()
    )


def test_hosts_listed_and_a_lost_host_forgotten_by_the_admin_only(
    gateway: RunningGateway, cluster: Cluster
) -> None:
    lost, vm_id = cluster.lost_host("gone-1")
    cluster.beat(cluster.live, time.time())
    assert [lease.holder for lease in cluster.assets.leases(cluster.asset.asset_id)] == [vm_id]
    customer = new_customer(gateway)
    admin = {"Authorization": f"Bearer {gateway.admin_token}"}
    user = {"Authorization": f"Bearer {customer.key}"}
    with httpx.Client(base_url=gateway.url, verify=client_context(gateway.ca_cert)) as h:
        # a customer's key opens neither route, and changes nothing
        assert h.get("/v1/hosts", headers=user).status_code in (401, 403)
        assert h.delete(f"/v1/hosts/{lost}", headers=user).status_code in (401, 403)
        assert h.delete(f"/v1/hosts/{lost}").status_code == 401

        r = h.get("/v1/hosts", headers=admin)
        assert r.status_code == 200, r.text
        _check("/v1/hosts", "GET", r)
        got: dict[str, Any] = {x["host_id"]: x for x in r.json()["hosts"]}
        assert got[lost]["name"] == "gone-1" and got[lost]["lost_at"] is not None
        assert not got[lost]["schedulable"] and got[lost]["vms"] == {"lost": 1}
        assert got[lost]["heartbeat_age_s"] >= 3600
        assert got[cluster.live]["schedulable"] and got[cluster.live]["lost_at"] is None
        assert got[cluster.live]["heartbeat_age_s"] < 30
        assert (got[lost]["cpus"], got[lost]["memory_bytes"]) == (2, 1024 * MIB)

        # a live host is refused with what to do instead
        r = h.delete(f"/v1/hosts/{cluster.live}", headers=admin)
        assert r.status_code == 409, r.text
        _check("/v1/hosts/{host_id}", "DELETE", r)
        assert "is live" in r.json()["error"]["message"]
        assert "stop its metald" in r.json()["error"]["suggestion"]

        r = h.delete(f"/v1/hosts/{lost}", headers=admin)
        assert r.status_code == 200, r.text
        _check("/v1/hosts/{host_id}", "DELETE", r)
        assert r.json()["forgotten"] == {
            "host_id": lost, "name": "gone-1", "vms": [vm_id],
            "asset_leases_released": 1, "ip_leases_released": 0,
        }  # fmt: skip
        assert cluster.assets.leases(cluster.asset.asset_id) == []
        assert cluster.sched.list(host_id=lost) == []
        ids = [x["host_id"] for x in h.get("/v1/hosts", headers=admin).json()["hosts"]]
        assert lost not in ids and cluster.live in ids

        # retried: it is gone
        r = h.delete(f"/v1/hosts/{lost}", headers=admin)
        assert r.status_code == 404, r.text
        _check("/v1/hosts/{host_id}", "DELETE", r)
        assert f"host {lost} not found" in r.json()["error"]["message"]


def test_unkey_hosts_ls_and_forget(gateway: RunningGateway, cluster: Cluster) -> None:
    lost, vm_id = cluster.lost_host("gone-2")
    cluster.beat(cluster.live, time.time())
    r = run_unkey(gateway, "hosts", "ls")
    assert r.code == 0, r.err
    line = next(ln for ln in r.out.splitlines() if lost in ln)
    assert "gone-2" in line and "lost since" in line and "lost=1" in line
    assert "live" in next(ln for ln in r.out.splitlines() if cluster.live in ln)
    r = run_unkey(gateway, "hosts", "ls", "--json")
    assert r.code == 0, r.err
    assert {h["host_id"]: h["vms"] for h in json.loads(r.out)}[lost] == {"lost": 1}

    r = run_unkey(gateway, "hosts", "forget", cluster.live)
    assert r.code == 5, (r.code, r.err)  # Conflict
    assert "only a lost host can be forgotten" in r.err
    r = run_unkey(gateway, "hosts", "forget", lost, UNKEY_ADMIN_TOKEN="wrong")
    assert r.code == 3, (r.code, r.err)  # Unauthenticated
    r = run_unkey(gateway, "hosts", "forget", lost, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["vms"] == [vm_id]
    assert cluster.sched.list(host_id=lost) == []
    r = run_unkey(gateway, "hosts", "forget", lost)
    assert r.code == 4, (r.code, r.err)  # NotFound
    assert "not found" in r.err
