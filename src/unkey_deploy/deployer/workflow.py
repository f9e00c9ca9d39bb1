"""The deploy workflow itself: pure orchestration over the Protocols in :mod:`.api`."""

from __future__ import annotations

from typing import Any

from ..core.errors import UnkeyError
from .api import Builds, Deployments, DeployRequest, LaunchedVm, Vms


def run_deploy(
    req: DeployRequest,
    builds: Builds,
    vms: Vms,
    deployments: Deployments,
    *,
    current_state: str = "accepted",
) -> list[LaunchedVm]:
    """Build the image, then launch every replica; every step lands in the event stream.

    ``current_state`` is where a previous attempt left the deployment (a retried job after a
    worker crash): the build is cached by image digest, so resuming rebuilds cheaply.

    Raises the service's error (a core.errors.UnkeyError) after recording the deployment as
    failed with that error's code and message, so the worker can decide to retry or not.
    """
    dep = req.deployment_id

    def progress(phase: str, message: str, /, **data: Any) -> None:
        deployments.event(dep, phase, message, **data)

    try:
        if current_state != "deploying":
            deployments.set_state(dep, "building")
        deployments.event(dep, "build", f"building {req.image}")
        asset = builds.build(req, progress)
        deployments.event(
            dep,
            "asset",
            "asset ready" + (" (cached)" if asset.cached else ""),
            asset_id=asset.asset_id,
            build_id=asset.build_id,
            rootfs_bytes=asset.rootfs_bytes,
        )
        deployments.set_state(dep, "deploying", asset_id=asset.asset_id)
        launched = []
        for replica in range(req.replicas):
            vm = vms.launch(req, asset, replica, progress)
            launched.append(vm)
            deployments.event(
                dep,
                "vm",
                f"replica {replica} running on {vm.host_id}",
                vm_id=vm.vm_id,
                instance_id=vm.instance_id,
                url=vm.url,
            )
        url = launched[0].url if launched else None
        deployments.set_state(dep, "running", url=url)
        deployments.event(dep, "done", f"deployment running at {url}", url=url)
        return launched
    except UnkeyError as exc:
        deployments.set_state(dep, "failed", error=exc.to_dict())
        deployments.event(dep, "failed", exc.message, error=exc.to_dict())
        raise
