"""Build progress reaches the deployment's event stream, and the build cache keeps customers apart.

Everything real except the VMs: an image pushed to a local ``docker-registry``, gatewayd (the
deployment, its SSE stream), builderd's service with a worker thread on gatewayd's database, the
deploy workflow with ``DeployBuilds``. The VM side is a stand-in that reports what metald's
``launch_replica`` reports (booting is covered by tests/metald and tests/e2e).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.builder.service import BuildService, DeployBuilds, OciImageSource
from unkey_deploy.builder.vminit import build_init
from unkey_deploy.deployer.api import BuiltAsset, DeployRequest, LaunchedVm, Progress
from unkey_deploy.deployer.worker import request_from
from unkey_deploy.deployer.workflow import run_deploy
from unkey_deploy.gateway.client import Event
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store.db import make_engine, session_factory
from unkey_deploy.testing import images as im
from unkey_deploy.testing.gateway import RunningGateway, new_customer, running_gateway
from unkey_deploy.testing.gateway import TestCustomer as Customer
from unkey_deploy.testing.registry import Registry, start_registry

pytestmark = pytest.mark.root  # layers are applied with their owners (chown)

# an incompressible file, larger than the builder's read-ahead (two stages of 16 x 1 MiB): the
# download can only run that far ahead of extraction, so its layer reports bytes before its end
BIG = 48 << 20


@dataclass
class World:
    gateway: RunningGateway
    registry: Registry
    builder: BuildService
    records: cp.DeploymentRecords
    image: str
    layer_sizes: list[int]


class FakeVms:
    """Reports the steps metald's ``launch_replica`` reports; boots nothing."""

    def launch(
        self, req: DeployRequest, asset: BuiltAsset, replica: int, progress: Progress, /
    ) -> LaunchedVm:
        vm = f"vm_{req.deployment_id[-6:]}_{replica}"
        progress("vm", f"scheduled {vm} on host h1", vm_id=vm, host_id="h1")
        progress("vm", f"booting {vm} (sandbox)", vm_id=vm)
        url = f"http://10.9.0.{replica + 2}:8080"
        progress("vm", f"{vm} is running at {url}", vm_id=vm, url=url)
        return LaunchedVm(vm, f"inst_{vm}", "h1", url)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("progress")
    base = im.Layer.of(im.busybox_entries())
    big = im.Layer.of([im.E("data/", "dir"), im.E("data/random.bin", data=os.urandom(BIG))])
    app = im.Layer.of([im.E("app/", "dir"), im.E("app/www/", "dir"),
                       im.E("app/www/index.html", data=im.INDEX_HTML)])  # fmt: skip
    built = im.image([base, big, app], entrypoint=["/bin/busybox", "httpd", "-f", "-p", "8080"],
                     env=["PATH=/bin"], ports=["8080/tcp"])  # fmt: skip
    with (
        start_registry(tmp / "registry") as reg,
        running_gateway(tmp / "gw") as gw,
    ):
        im.push(reg.host, "acme/progress", "v1", built)
        engine = make_engine(gw.database_url)  # gatewayd migrated it (every service's branch)
        factory = session_factory(engine)
        assets = AssetManager(factory, FsBlobStore(tmp / "blobs"), tmp / "cache")
        svc = BuildService(factory, assets, OciImageSource(), work_dir=tmp / "work",
                           init_binary=build_init(tmp / "native"), poll_s=0.05)  # fmt: skip
        svc.start(1)
        try:
            yield World(gw, reg, svc, cp.DeploymentRecords(factory), reg.ref("acme/progress", "v1"),
                        [len(la.data) for la in (base, big, app)])  # fmt: skip
        finally:
            svc.stop()
            engine.dispose()


def _deploy(w: World, c: Customer) -> tuple[str, list[Event]]:
    """Deploy the image as ``c`` through gatewayd, run the workflow, return the event stream."""
    spec = {"name": "progress", "image": w.image, "port": 8080,
            "resources": {"cpu": 1, "memory": "256MiB"}}  # fmt: skip
    with w.gateway.client(c.key) as client:
        dep_id = client.deploy(spec)["deployment"]["id"]
        run_deploy(request_from(w.records.get(dep_id)), DeployBuilds(w.builder), FakeVms(),
                   w.records)  # fmt: skip
        events = list(client.events(dep_id, follow=False))
    return dep_id, events


def _progress(events: list[Event]) -> dict[str, list[dict[str, Any]]]:
    by_item: dict[str, list[dict[str, Any]]] = {}
    for ev in events:
        p = ev.data.get("data", {}).get("progress")
        if p is not None:
            assert ev.event == "build"
            by_item.setdefault(p["item"], []).append(p)
    return by_item


def test_layer_and_rootfs_progress_reach_the_event_stream(world: World) -> None:
    dep_id, events = _deploy(world, new_customer(world.gateway))
    assert events[-1].event == "end" and events[-1].data["state"] == "running"
    by_item = _progress(events)
    layers = [item for item in by_item if item.startswith("layer ")]
    # one item per layer, named by position and digest, with the layer's size as its total
    assert len(layers) == 3, sorted(by_item)
    for i, size in enumerate(world.layer_sizes):
        (item,) = [x for x in layers if x.startswith(f"layer {i + 1}/3 sha256:")]
        records = by_item[item]
        dones = [r["done"] for r in records]
        assert all(r["unit"] == "bytes" and r["total"] == size for r in records), records
        assert dones == sorted(dones) and len(set(dones)) == len(dones)  # strictly increasing
        assert all(0 <= d <= size for d in dones)
        assert dones[-1] == size  # the final record: every byte, verified
    big = by_item[next(x for x in layers if x.startswith("layer 2/3"))]
    assert big[0]["done"] < big[0]["total"]  # the big layer showed progress before its end
    rootfs = by_item["rootfs"]
    assert [r["done"] for r in rootfs] == [0, 1, 2, 3]
    assert all(r["unit"] == "steps" and r["total"] == 3 for r in rootfs)
    # progress, then the asset, scheduling, boot, and the URL at the end
    phases = [e.event for e in events]
    last_progress = max(i for i, e in enumerate(events) if "progress" in e.data.get("data", {}))
    assert phases.index("asset") > last_progress
    assert events[-2].event == "done" and events[-2].data["data"]["url"].startswith("http://")
    # each event's message is the readable form of its progress (`unkey logs` shows it)
    big_final = next(e for e in events if e.data["data"].get("progress") == big[-1])
    assert big_final.data["message"].startswith(big[-1]["item"] + ": ")
    assert big_final.data["message"].endswith(" MB (100%)")
    assert dep_id.startswith("dep_")


def test_cache_hit_of_another_customer_shows_none_of_their_ids(world: World) -> None:
    alice, bob = new_customer(world.gateway), new_customer(world.gateway)
    a_dep, a_events = _deploy(world, alice)
    b_dep, b_events = _deploy(world, bob)
    with world.gateway.client(alice.key) as a, world.gateway.client(bob.key) as b:
        a_shown = a.get_deployment(a_dep)["deployment"]
        b_shown = b.get_deployment(b_dep)["deployment"]
    a_asset = a_shown["asset_id"]
    a_build = next(e.data["data"]["build_id"] for e in a_events if e.event == "asset")
    b_asset_event = next(e for e in b_events if e.event == "asset")
    assert b_asset_event.data["message"] == "asset ready (cached)"
    # bob got an asset of his own (same stored bytes), and his build is his own
    assert b_shown["asset_id"] and b_shown["asset_id"] != a_asset
    mine = world.builder.assets.get(b_shown["asset_id"])
    assert mine.customer_id == bob.id
    assert mine.blob_sha256 == world.builder.assets.get(a_asset).blob_sha256
    # nothing of alice's in anything bob can read: his events and his deployment
    seen = json.dumps([e.data for e in b_events]) + json.dumps(b_shown)
    for foreign in (a_asset, a_build, alice.id, alice.tenant_id, a_dep):
        assert foreign not in seen, foreign
    # a hit builds nothing: no layer progress for bob
    assert not _progress(b_events)
