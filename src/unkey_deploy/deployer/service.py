"""``python -m unkey_deploy.deployer.service``: the deploy workers as their own process.

Wires the workflow to builderd (submit + wait; builderd's own workers do the building), the
asset store (where the rootfs lives) and metald's scheduler (placement across registered hosts;
each host's agent boots its VMs).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

from ..assets.service import open_assets
from ..builder.api import BuildState
from ..builder.service import DeployBuilds, open_builder
from ..core import metrics
from ..core.config import Settings, load
from ..core.errors import IllegalTransition, NotFound
from ..core.ids import BuildId
from ..core.log import configure
from ..metald.api import Scheduler
from ..store.db import make_engine, session_factory, upgrade
from .api import BuiltAsset
from .metald_vms import MetaldVms
from .worker import DeployWorker


class BuilderBuilds(DeployBuilds):
    """``api.Builds`` over builderd: :class:`DeployBuilds` (submit, stream, wait) plus the
    cancel of a build that runs for one deployment only."""

    def cancel(self, build_id: str, deployment_id: str, /) -> bool:
        try:
            build = self.builder.get(BuildId(build_id))
            if build.deployment_id != deployment_id or build.state not in (
                BuildState.QUEUED, BuildState.RUNNING,
            ):  # fmt: skip
                return False
            self.builder.cancel(BuildId(build_id))
        except (NotFound, IllegalTransition):  # gone, or finished since we looked
            return False
        return True


def build_workers(settings: Settings, *, count: int = 2) -> list[DeployWorker]:
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    factory = session_factory(engine)
    assets = open_assets(settings)
    builds = BuilderBuilds(open_builder(settings))

    def rootfs_for(asset: BuiltAsset) -> Path:
        return assets.local_path(asset.asset_id)  # type: ignore[arg-type]

    vms = MetaldVms(Scheduler(engine, leases=assets), rootfs_for)
    host = socket.gethostname()
    return [
        DeployWorker(factory, builds, vms, worker_id=f"deployer-{host}-{os.getpid()}-{i}")
        for i in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    settings = load(environ=os.environ)
    configure("deployer", settings.log_level)
    metrics.serve(settings.metrics.deployer, metrics.DEPLOYER)
    workers = build_workers(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for w in workers:
        w.start()
    print(f"deployer: {len(workers)} workers", file=sys.stderr, flush=True)
    stop.wait()
    for w in workers:
        w.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
