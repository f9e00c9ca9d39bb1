"""``unkey logs DEPLOYMENT [--follow]``: a deployment's build log, then its VMs' consoles.

The build log is the deployment's event stream (``GET /v1/deployments/{id}/events``: every
build step, scheduling, boot, health check); the console is what each VM wrote to its serial
console (``GET /v1/deployments/{id}/logs``). ``--follow`` streams the events until the
deployment settles, then keeps printing new console output until the VMs stop (or Ctrl-C).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from . import config as cli_config
from .output import EventRenderer, err

Json = dict[str, Any]
# VM states after which its console cannot grow (metald's VmState values)
_FINAL_VM_STATES = frozenset({"stopped", "failed", "deleted", "lost"})


def _console_header(vm: Json) -> str:
    inst = f" instance {vm['instance_id']}" if vm.get("instance_id") else ""
    return f"==> console of VM {vm['vm_id']}{inst} ({vm['state']})"


@click.command("logs")
@click.argument("deployment_id")
@click.option("--follow", "-f", is_flag=True, help="keep streaming until the VMs stop (Ctrl-C)")
@click.option("--build/--no-build", default=True, show_default=True, help="show the build log")
@click.option(
    "--console/--no-console", default=True, show_default=True, help="show the VMs' consoles"
)
@click.option("--tail", default=64 * 1024, show_default=True, help="console bytes per VM")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="--follow poll interval (s)",
)
def logs(
    *, deployment_id: str, follow: bool, build: bool, console: bool, tail: int, interval: float
) -> None:
    """A deployment's build log and its VMs' serial consoles."""
    with cli_config.resolve().client() as client:
        if build:
            click.echo(f"==> build log of deployment {deployment_id}")
            # the same rendering as `deployments events`: build progress summarised per item
            with EventRenderer(sys.stdout, live=False, full_time=True) as view:
                for ev in client.events(deployment_id, follow=follow):
                    if ev.event == "end":
                        break
                    view.event(ev.event, ev.data)
        if not console:
            return
        path = f"/v1/deployments/{deployment_id}/logs"
        body: Json = client.request("GET", path, params={"tail": tail}).json()
        offsets: dict[str, int] = {}
        for vm in body["vms"]:
            click.echo(_console_header(vm))
            if vm["truncated"]:
                click.echo(f"... (earlier output left out; --tail {tail})")
            click.echo(vm["console"], nl=not vm["console"].endswith("\n"))
            offsets[vm["vm_id"]] = vm["size"]
        if not body["vms"]:
            err.print("no VM has been created for this deployment (yet)", highlight=False)
        if not follow:
            return
        try:
            while True:
                if body["vms"] and all(v["state"] in _FINAL_VM_STATES for v in body["vms"]):
                    return
                time.sleep(interval)
                body = client.request("GET", path, params={"tail": 1}).json()
                for vm in body["vms"]:
                    known = offsets.get(vm["vm_id"])
                    if known is None:
                        click.echo(_console_header(vm))
                        known = 0
                    if vm["size"] == known:
                        continue
                    new = client.request(
                        "GET", path, params={"tail": tail, "offset": known, "vm": vm["vm_id"]}
                    ).json()["vms"]
                    for v in new:
                        if v["truncated"]:
                            click.echo(f"... (output left out; --tail {tail})")
                        click.echo(v["console"], nl=False)
                        offsets[v["vm_id"]] = v["size"]
        except KeyboardInterrupt:
            return


def register(group: click.Group) -> None:
    """Add ``unkey logs`` to the top-level group."""
    group.add_command(logs)
