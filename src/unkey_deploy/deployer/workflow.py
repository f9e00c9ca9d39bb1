"""The deploy and stop workflows: pure orchestration over the Protocols in :mod:`.api`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.errors import IllegalTransition, UnkeyError
from .api import Builds, Deployments, DeployRequest, Interrupted, Interruption, LaunchedVm, Vms

_DEPLOYING = ("building", "deploying")  # the states in which a deploy may record its failure


def run_deploy(
    req: DeployRequest,
    builds: Builds,
    vms: Vms,
    deployments: Deployments,
    *,
    current_state: str = "accepted",
    interruption: Interruption | None = None,
    will_retry: Callable[[UnkeyError], bool] = lambda _exc: False,
) -> list[LaunchedVm]:
    """Build the image, then launch every replica; every step lands in the event stream.

    ``current_state`` is where a previous attempt left the deployment (a retried job after a
    worker crash, or after a failed attempt): the build is cached by image digest, so resuming
    rebuilds cheaply, and the VMs an earlier attempt left are deleted before any is launched.

    ``interruption`` is the user's stop: checked at every step and progress event, it raises
    :class:`.api.Interrupted` (so does a move of the deployment the lifecycle refuses: someone
    else, the user's stop, moved it). Then nothing is recorded: the caller deletes what was
    created (:func:`wind_down`) and the stop job owns the deployment.

    Raises the service's error (a core.errors.UnkeyError) after deleting the replicas this
    attempt launched and recording the deployment as failed with that error's code and
    message; unless ``will_retry(error)`` (the worker's job will run again): then the
    deployment stays where it is (``building``/``deploying``), so whoever waits for it waits
    for the outcome, and the worker records the failed attempt and when it is retried; unless
    the stop was requested meanwhile (``interruption.confirmed()``): a step that failed because
    the deployment is being torn down (its VM deleted under the launch) is Interrupted.
    """
    dep = req.deployment_id
    stop = interruption or Interruption()

    def progress(phase: str, message: str, /, **data: Any) -> None:
        deployments.event(dep, phase, message, **data)
        if stop.build_id is None and phase == "build" and data.get("build_id"):
            stop.build_id = str(data["build_id"])
        stop.check()

    def move(state: str, **fields: Any) -> None:
        stop.check()
        try:
            deployments.set_state(dep, state, **fields)
        except IllegalTransition as exc:
            # the user cancelled or stopped the deployment since the job was claimed; it is
            # theirs now, never recorded failed by us
            raise Interrupted(f"deployment {dep} was moved under the deploy: {exc}") from exc

    def record(phase: str, message: str, /, **data: Any) -> None:
        deployments.event(dep, phase, message, **data)

    if current_state != "deploying":
        move("building")
    launched: list[LaunchedVm] = []
    launching = False  # VMs of this attempt may exist (also a failed launch's, being deleted)
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
        move("deploying", asset_id=asset.asset_id)
        if current_state != "accepted":
            # a retried job: an earlier attempt (a crashed worker's, or one that failed) may
            # have left VMs, and launching beside them would run more than ``replicas``
            vms.stop_all(dep, progress)
        launching = True
        for replica in range(req.replicas):
            stop.check()
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
        move("running", url=url)
        deployments.event(dep, "done", f"deployment running at {url}", url=url)
        return launched
    except UnkeyError as exc:
        if stop.confirmed():
            raise Interrupted(f"deployment {dep} was stopped ({exc.message})") from exc
        if launching:
            # the replicas already running go with the attempt, and a failed launch's VM is
            # waited for: a failed deployment runs (and is billed for) nothing, holds no
            # capacity, and a retry starts from no VMs
            try:
                vms.stop_all(dep, record)
            except UnkeyError as left:
                record("vm", f"the failed deploy's VMs are not all deleted yet ({left.message});"
                       " a retry or a stop deletes them", error=left.to_dict())  # fmt: skip
        if will_retry(exc):
            raise  # not failed yet: the next attempt decides
        try:  # a stop committed since that look moved it: then it is the stop's, not failed
            deployments.set_state(dep, "failed", error=exc.to_dict(), only_from=_DEPLOYING)
        except IllegalTransition as moved:
            raise Interrupted(f"deployment {dep} was moved under the deploy: {moved}") from exc
        deployments.event(dep, "failed", exc.message, error=exc.to_dict())
        raise


def wind_down(
    deployment_id: str,
    builds: Builds,
    vms: Vms,
    deployments: Deployments,
    *,
    interruption: Interruption,
    why: Interrupted,
) -> list[str]:
    """After :class:`.api.Interrupted`: cancel the deploy's build if it still runs for this
    deployment only, then delete every VM the deploy created and wait until each is gone (its
    process, cgroup, network, jail, asset lease and capacity freed). Returns the deleted VMs.

    Records no state (``stopping`` belongs to the stop job, which deletes whatever this could
    not); a failure to delete is an event, not an error, for the same reason."""
    dep = deployment_id

    def progress(phase: str, message: str, /, **data: Any) -> None:
        deployments.event(dep, phase, message, **data)

    deployments.event(dep, "stop", f"deploy interrupted: {why}")
    if interruption.build_id is not None:
        try:
            if builds.cancel(interruption.build_id, dep):
                deployments.event(dep, "build", f"build {interruption.build_id} cancelled",
                                  build_id=interruption.build_id)  # fmt: skip
        except UnkeyError as exc:
            deployments.event(dep, "build", f"could not cancel build {interruption.build_id}: "
                              f"{exc.message}", build_id=interruption.build_id)  # fmt: skip
    try:
        return vms.stop_all(dep, progress)
    except UnkeyError as exc:
        deployments.event(
            dep, "stop", f"the interrupted deploy's VMs are not all deleted yet ({exc.message});"
            " the stop job deletes them", error=exc.to_dict(),
        )  # fmt: skip
        return []


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
    deployment left ``failed`` goes back to ``stopping`` first.

    Raises the error and records nothing of it: whether the deployment is ``failed`` depends on
    whether its stop job will be retried, which only the worker knows (a stop that will be
    retried keeps the deployment ``stopping``, so whoever waits for it waits for the outcome).
    """
    dep = deployment_id

    def progress(phase: str, message: str, /, **data: Any) -> None:
        deployments.event(dep, phase, message, **data)

    if current_state == "stopped":
        return []
    if current_state != "stopping":
        deployments.set_state(dep, "stopping")  # failed -> stopping; anything else is illegal
    deleted = vms.stop_all(dep, progress)
    deployments.set_state(dep, "stopped")
    # a retried stop may find the VMs gone already (deleted after the last attempt gave up)
    what = f"{len(deleted)} VMs deleted" if deleted else "no VMs left"
    deployments.event(dep, "done", f"deployment stopped ({what})", vms=deleted)
    return deleted
