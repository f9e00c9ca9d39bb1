"""The workflow's view of metald: one replica = one ``launch_replica`` through the scheduler;
a stop = ``delete`` of each of the deployment's VMs, carried out by their hosts' reconcilers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..core.errors import DeadlineExceeded, IllegalTransition, NotFound
from ..metald.api import MetaldApi, VmState
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
        stop_timeout_s: float = 120.0,
    ) -> None:
        self.api = api
        self.rootfs_for = rootfs_for
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s

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
            health_port=req.healthcheck_port,
            timeout=self.ready_timeout_s,
            progress=progress,
        )
        return LaunchedVm(
            vm_id=vm.vm_id, instance_id=vm.instance_id or "", host_id=vm.host_id, url=vm.url
        )

    def abort(self, deployment_id: str, /) -> list[str]:
        """See :meth:`.api.Vms.abort`: ``desired=deleted`` on each VM not asked for yet. A
        launch that creates and boots a VM between two calls may set ``desired=running`` back
        (boot follows create), which is why the interrupting side calls this repeatedly."""
        asked: list[str] = []
        for vm in self.api.list(deployment_id=deployment_id):
            if vm.desired == "deleted":
                continue
            try:
                self.api.delete(vm.vm_id)
            except (NotFound, IllegalTransition):  # gone, or moving: the next call asks again
                continue
            asked.append(vm.vm_id)
        return asked

    def stop_all(self, deployment_id: str, progress: Progress, /) -> list[str]:
        """See :meth:`.api.Vms.stop_all`. Through the scheduler, ``delete`` records
        ``desired=deleted`` and the VM's host stops and deletes it (its row goes: that is
        "deleted"); through a host's own Metald it happens in the call."""
        deadline = time.monotonic() + self.stop_timeout_s
        asked: set[str] = set()
        deleted: list[str] = []
        delay = 0.02
        while True:
            vms = self.api.list(deployment_id=deployment_id)
            present = {vm.vm_id for vm in vms}
            for vm_id in sorted(asked - present - set(deleted)):
                deleted.append(vm_id)
                progress("vm", f"{vm_id} stopped and deleted", vm_id=vm_id)
            for vm in vms:
                if vm.vm_id in asked:
                    continue
                try:
                    self.api.delete(vm.vm_id)
                except NotFound:  # deleted between our list and the call
                    continue
                except IllegalTransition:  # another actor is moving it; ask again next pass
                    continue
                asked.add(vm.vm_id)
                if vm.state == VmState.LOST:
                    progress("vm", f"{vm.vm_id} was lost with host {vm.host_id}: it is not "
                             "replaced, and that host frees it should it come back",
                             vm_id=vm.vm_id, host_id=vm.host_id)  # fmt: skip
                else:
                    progress("vm", f"deleting {vm.vm_id} ({vm.state} on host {vm.host_id})",
                             vm_id=vm.vm_id, host_id=vm.host_id, state=str(vm.state))  # fmt: skip
            # a lost VM's host is gone: its row stays until that host returns, never waited for
            waiting = [vm for vm in vms if vm.state != VmState.LOST]
            if not waiting and asked >= present:
                return deleted
            if time.monotonic() > deadline:
                left = ", ".join(f"{vm.vm_id} ({vm.state}{': ' + vm.error if vm.error else ''})"
                                 for vm in waiting)  # fmt: skip
                raise DeadlineExceeded(
                    f"VMs of deployment {deployment_id} still not deleted after "
                    f"{self.stop_timeout_s:.0f} s: {left}",
                    suggestion="check the hosts' metald (`unkey dev status`); the stop is "
                    "retried, or stop the deployment again",
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
