"""Stopping a deployment while builderd is building its image: the build is cancelled too.

Real parts: an image in a local ``docker-registry``, gatewayd, builderd's service (one worker,
a short lease so its heartbeat looks for cancels every half second) and the deployer worker.
The image source is the real one with its extraction held (a log line every 0.1 s, as a long
layer download logs progress) so the stop surely lands while the build runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.builder.api import BuildState, Log, OnProgress, SourceImage
from unkey_deploy.builder.service import BuildService, OciImageSource
from unkey_deploy.builder.vminit import build_init
from unkey_deploy.core.ids import BuildId, CustomerId
from unkey_deploy.deployer.metald_vms import MetaldVms
from unkey_deploy.deployer.service import BuilderBuilds
from unkey_deploy.deployer.worker import DeployWorker
from unkey_deploy.metald.api import Scheduler
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import jobs
from unkey_deploy.store.db import make_engine, session_factory
from unkey_deploy.testing import images as im
from unkey_deploy.testing.gateway import RunningGateway, new_customer, run_unkey, running_gateway
from unkey_deploy.testing.registry import start_registry

pytestmark = pytest.mark.root  # layers applied with their owners

HELD = "extract: held by the test"


class HeldSource(OciImageSource):
    """The real source; extraction first logs :data:`HELD` every 0.1 s for up to 30 s. The
    builder's ``log`` raises its Cancelled once its heartbeat has seen a cancel request."""

    def extract(
        self, image: SourceImage, root: Path, log: Log, /, progress: OnProgress | None = None
    ) -> None:
        for _ in range(300):
            log(HELD)
            time.sleep(0.1)
        super().extract(image, root, log, progress=progress)


@dataclass
class World:
    gateway: RunningGateway
    image: str
    builder: BuildService
    assets: AssetManager
    records: cp.DeploymentRecords
    jobs: Callable[[str, str], list[jobs.Job]]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    built = im.image([im.Layer.of(im.busybox_entries())], entrypoint=["/bin/busybox", "httpd",
                     "-f", "-p", "8080"], env=["PATH=/bin"])  # fmt: skip
    with start_registry(tmp_path / "registry") as reg, running_gateway(tmp_path / "gw") as gw:
        im.push(reg.host, "acme/held", "v1", built)
        engine = make_engine(gw.database_url)
        factory = session_factory(engine)
        assets = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
        builder = BuildService(
            factory, assets, HeldSource(), work_dir=tmp_path / "work",
            init_binary=build_init(tmp_path / "native"), poll_s=0.05, lease_s=1.5,
        )  # fmt: skip
        scheduler = Scheduler(engine, leases=assets)  # no host: no deploy here gets that far
        vms = MetaldVms(scheduler, lambda a: (_ for _ in ()).throw(AssertionError(a)))
        worker = DeployWorker(factory, BuilderBuilds(builder), vms, worker_id="test-stop-build",
                              poll_s=0.05, cancel_poll_s=0.05)  # fmt: skip

        def of(kind: str, dep_id: str) -> list[jobs.Job]:
            with factory() as s:
                return [j for j in jobs.list_jobs(s, kind) if j.payload["deployment_id"] == dep_id]

        builder.start(1)
        worker.start()
        try:
            yield World(gw, reg.ref("acme/held", "v1"), builder, assets,
                        cp.DeploymentRecords(factory), of)  # fmt: skip
        finally:
            worker.stop()
            builder.stop()
            scheduler.close()
            engine.dispose()


def _until(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.05)
    return got


@pytest.mark.timeout(180)
def test_stop_while_building_cancels_the_running_build(world: World) -> None:
    owner = new_customer(world.gateway)
    spec = {"name": "held", "image": world.image, "port": 8080,
            "resources": {"cpu": 1, "memory": "64MiB"}}  # fmt: skip
    with world.gateway.client(owner.key) as client:
        dep_id = client.deploy(spec)["deployment"]["id"]

        def held_build() -> str | None:
            for e in client.events(dep_id, follow=False):
                if e.data.get("message") == HELD:
                    return str(e.data["data"]["build_id"])
            return None

        build_id = BuildId(_until("build held in its extraction", held_build))
    assert world.builder.get(build_id).state == BuildState.RUNNING
    assert world.records.get(dep_id).state == "building"
    # a build is cancelled for the deployment it runs for only
    assert not BuilderBuilds(world.builder).cancel(build_id, "dep_someoneelse")

    out = run_unkey(world.gateway, "deployments", "stop", dep_id, "--wait", api_key=owner.key)
    assert out.code == 0 and out.out.strip() == "stopped", out
    assert "deploy interrupted" in out.err and f"build {build_id} cancelled" in out.err, out.err
    build = _until(
        "cancelled build",
        lambda: (
            (b := world.builder.get(build_id)).state
            in (BuildState.CANCELLED, BuildState.SUCCEEDED, BuildState.FAILED)
            and b
        ),
    )
    assert build.state == BuildState.CANCELLED, build
    assert build.log[-1] == "cancelled"  # not after the hold: that build would have succeeded

    (deploy_job,) = world.jobs("deploy", dep_id)
    assert deploy_job.state == jobs.JobState.CANCELLED
    (stop_job,) = world.jobs("stop", dep_id)
    assert stop_job.state == jobs.JobState.SUCCEEDED
    with world.gateway.client(owner.key) as client:
        events = list(client.events(dep_id, follow=False))
    states = [e.data["data"]["state"] for e in events if e.event == "state"]
    assert states == ["building", "stopping", "stopped"], states
    assert "failed" not in [e.event for e in events]
    assert world.assets.list(CustomerId(owner.id)) == []  # the build registered nothing
