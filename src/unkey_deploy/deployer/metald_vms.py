"""The workflow's view of metald: one replica = one ``launch_replica`` through the scheduler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..metald.api import MetaldApi
from ..metald.launch import launch_replica
from .api import BuiltAsset, DeployRequest, LaunchedVm, Progress

DEFAULT_PORT = 8080


class MetaldVms:
    """Launch replicas through metald; ``rootfs_for`` gives the asset's rootfs on this host."""

    def __init__(
        self,
        api: MetaldApi,
        rootfs_for: Callable[[BuiltAsset], Path],
        *,
        ready_timeout_s: float = 180.0,
    ) -> None:
        self.api = api
        self.rootfs_for = rootfs_for
        self.ready_timeout_s = ready_timeout_s

    def launch(
        self, req: DeployRequest, asset: BuiltAsset, replica: int, progress: Progress, /
    ) -> LaunchedVm:
        vm = launch_replica(
            self.api,
            deployment_id=req.deployment_id,
            customer_id=req.customer_id,
            rootfs=self.rootfs_for(asset),
            asset_id=asset.asset_id,  # the VM leases its asset: gc never deletes it under us
            vcpus=req.vcpus,
            memory_bytes=req.memory_bytes,
            port=req.port or DEFAULT_PORT,
            env=dict(req.env),
            health_path=req.healthcheck_path,
            timeout=self.ready_timeout_s,
            progress=progress,
        )
        return LaunchedVm(
            vm_id=vm.vm_id, instance_id=vm.instance_id or "", host_id=vm.host_id, url=vm.url
        )
