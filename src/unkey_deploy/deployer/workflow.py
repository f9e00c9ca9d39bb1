"""The deploy and stop workflows: pure orchestration over the Protocols in :mod:`.api`."""

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

    if current_state != "deploying":
        # outside the try: an IllegalTransition here means the user cancelled or stopped the
        # deployment after the job was claimed; it is theirs now, never recorded failed
        deployments.set_state(dep, "building")
    try:
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


def run_stop(
    deployment_id: str,
    vms: Vms,
    deployments: Deployments,
    *,
    current_state: str = "stopping",
) -> list[str]:
    """Tear a deployment down: delete every VM it has, then record it ``stopped``; each VM
    deleted is an event. Returns the deleted VMs' ids.

    Safe to run again (a retried stop job after a worker crash or a failed attempt): VMs
    already deleted are gone from the list and those being deleted are waited for; a
    deployment that a failed attempt left ``failed`` goes back to ``stopping`` first.

    Raises the error after recording the deployment ``failed`` with it, like :func:`run_deploy`.
    """
    dep = deployment_id

    def progress(phase: str, message: str, /, **data: Any) -> None:
        deployments.event(dep, phase, message, **data)

    if current_state == "stopped":
        return []
    if current_state != "stopping":
        deployments.set_state(dep, "stopping")  # failed -> stopping; anything else is illegal
    try:
        deleted = vms.stop_all(dep, progress)
        deployments.set_state(dep, "stopped")
        # a retried stop may find the VMs gone already (deleted after the last attempt gave up)
        what = f"{len(deleted)} VMs deleted" if deleted else "no VMs left"
        deployments.event(dep, "done", f"deployment stopped ({what})", vms=deleted)
        return deleted
    except UnkeyError as exc:
        deployments.set_state(dep, "failed", error=exc.to_dict())
        deployments.event(dep, "failed", f"stop failed: {exc.message}", error=exc.to_dict())
        raise
