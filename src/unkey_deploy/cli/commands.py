"""The API commands of ``unkey``: deploy, deployments, keys, customers, hosts, login, dev,
gatewayd."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from .. import appspec
from ..core import config as core_config
from ..core.errors import (
    Conflict,
    DeadlineExceeded,
    InvalidInput,
    Unavailable,
    ValidationFailed,
    from_dict,
)
from . import config as cli_config
from .output import EventRenderer, err, print_json, table

Json = dict[str, Any]


def _settings() -> cli_config.ClientSettings:
    return cli_config.resolve()


def _when(ts: str | None) -> str:
    return (ts or "").replace("T", " ")[:19]


def _decimal(value: str | None, what: str) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(value)
    except InvalidOperation:
        raise InvalidInput(f"{what} {value!r} is not a decimal number") from None


# --- deploy ---------------------------------------------------------------------------------------


def _follow(
    client: Any, deployment_id: str, timeout_s: float, *, from_phase: str | None = None
) -> Json:
    """Show the deployment's progress on stderr until it ends; return the final state.

    On a terminal, build progress (layer downloads, rootfs creation) are live bars and the other
    steps (scheduling, boot, health check) lines above them; otherwise plain, throttled lines.
    With ``from_phase``, the events before the first one of that phase are not shown (a stop
    shows the stop, not the deploy before it).
    """
    deadline = time.monotonic() + timeout_s
    last: int | None = None
    showing = from_phase is None
    with EventRenderer(sys.stderr) as view:
        for _attempt in range(30):
            try:
                for ev in client.events(deployment_id, last_event_id=last, deadline=deadline):
                    if ev.event == "end":
                        return dict(ev.data)
                    last = ev.id
                    showing = showing or ev.event == from_phase
                    if showing:
                        view.event(ev.event, ev.data)
                    if time.monotonic() > deadline:
                        break
            except Unavailable:
                time.sleep(1)  # the gateway restarted: resume from the last event seen
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"deployment {deployment_id} did not finish within {timeout_s:.0f} s",
                    suggestion=f"follow it with `unkey deployments show {deployment_id}`",
                )
    raise Unavailable("lost the event stream too many times")


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--wait",
    is_flag=True,
    help="follow progress (stderr) until running or failed, then print the app's URL",
)
@click.option("--json", "as_json", is_flag=True, help="print the deployment as JSON")
@click.option("--idempotency-key", help="default: a fresh one (retries reuse it)")
@click.option("--timeout", "timeout_s", default=900.0, show_default=True, help="for --wait (s)")
def deploy(
    file: Path, wait: bool, as_json: bool, idempotency_key: str | None, timeout_s: float
) -> None:
    """Validate FILE (app.yaml) and deploy it.

    Prints the deployment's id (with --wait: the app's URL once it runs; --json: the deployment).
    With --wait the exit code says how it ended: 0 running, the error's code when it failed,
    5 (conflict) when it was stopped before it ran.
    """
    try:
        spec = appspec.load_file(file)
    except ValidationFailed as exc:
        for p in exc.problems:
            click.echo(p.render(str(file)), err=True)
        raise ValidationFailed(
            f"{file} is not a valid app spec", [], suggestion="fix the problems listed above"
        ) from None
    key = idempotency_key or f"cli-{uuid.uuid4()}"
    with _settings().client() as client:
        result: Json | None = None
        for attempt in range(3):
            try:
                result = client.deploy(
                    spec.model_dump(mode="json", exclude_none=True), idempotency_key=key
                )
                break
            except Unavailable:
                if attempt == 2:
                    raise
                time.sleep(1 + attempt)
        assert result is not None  # noqa: S101 (loop either sets it or raises)
        dep = result["deployment"]
        err.print(
            f"deployment [bold]{dep['id']}[/] accepted ({escape(dep['name'])}, "
            f"{escape(dep['image'])})",
            highlight=False,
        )
        if wait:
            end = _follow(client, dep["id"], timeout_s)
            dep = client.get_deployment(dep["id"])["deployment"]
            if end.get("state") == "failed" or dep["state"] == "failed":
                raise from_dict(dep.get("error") or {"message": "deployment failed"})
            if dep["state"] != "running":
                # stopped (or cancelled) by someone while it was on its way: it never ran
                raise Conflict(
                    f"deployment {dep['id']} was {dep['state']} before it ran",
                    details={"deployment_id": dep["id"], "state": dep["state"]},
                    suggestion=f"see who stopped it: `unkey deployments show {dep['id']}`;"
                    " deploy again to run it",
                )
            err.print(f"deployment {dep['id']} is {dep['state']}", highlight=False, markup=False)
    if as_json:
        print_json(dep)
    else:
        # what a person (or a script) wants next: where the app answers, once it does
        click.echo(dep["url"] if wait and dep.get("url") else dep["id"])


# --- deployments ----------------------------------------------------------------------------------


@click.group()
def deployments() -> None:
    """List, inspect and stop deployments."""


@deployments.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", default=50, show_default=True)
@click.option("--state", default=None, help="only deployments in this state")
def deployments_ls(as_json: bool, limit: int, state: str | None) -> None:
    """Your tenant's deployments, newest first."""
    with _settings().client() as client:
        deps = client.list_deployments(limit=limit, state=state)["deployments"]
    if as_json:
        print_json(deps)
        return
    table(
        None,
        ["ID", "NAME", "IMAGE", "STATE", "URL", "CREATED"],
        [
            [d["id"], d["name"], d["image"], d["state"], d["url"], _when(d["created_at"])]
            for d in deps
        ],
    )


@deployments.command("show")
@click.argument("deployment_id")
@click.option("--json", "as_json", is_flag=True)
def deployments_show(deployment_id: str, as_json: bool) -> None:
    """One deployment with its state and spec."""
    with _settings().client() as client:
        dep = client.get_deployment(deployment_id)["deployment"]
    if as_json:
        print_json(dep)
        return
    rows = [
        [k, dep[k]]
        for k in (
            "id",
            "name",
            "image",
            "state",
            "url",
            "customer_id",
            "request_id",
            "job_id",
            "created_at",
            "updated_at",
        )
    ]
    if dep.get("error"):
        rows.append(["error", dep["error"].get("message")])
    table(None, ["FIELD", "VALUE"], rows)


@deployments.command("stop")
@click.argument("deployment_id")
@click.option(
    "--wait", is_flag=True, help="follow progress (stderr) until the stop's final outcome: "
    "stopped, or failed once no retry is left",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print the deployment as JSON")
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, help="for --wait (s)")
def deployments_stop(deployment_id: str, wait: bool, as_json: bool, timeout_s: float) -> None:
    """Stop a deployment and delete its VMs.

    A running or failed deployment becomes `stopping`, then `stopped` once each VM is deleted;
    one still building or deploying becomes `stopping` too: its deploy is interrupted (its
    build cancelled, any VM it created deleted). One not started yet is `cancelled` at once.
    Stopping again is harmless. Prints the deployment's state (--json: the deployment).

    With --wait, a stop attempt that fails and will be retried is shown and waited through (the
    deployment stays `stopping`); the command fails only once the stop has finally failed (the
    deployment reads `failed`, which the deployer writes only when no attempt is left).
    """
    with _settings().client() as client:
        dep = client.stop_deployment(deployment_id)["deployment"]
        err.print(f"deployment {dep['id']} is {dep['state']}", highlight=False, markup=False)
        if wait and dep["state"] == "stopping":
            # the event stream ends only at a final state: a retried stop keeps it stopping
            _follow(client, dep["id"], timeout_s, from_phase="stop")
            dep = client.get_deployment(dep["id"])["deployment"]
            if dep["state"] == "failed":
                raise from_dict(dep.get("error") or {"message": "stopping the deployment failed"})
            err.print(f"deployment {dep['id']} is {dep['state']}", highlight=False, markup=False)
    if as_json:
        print_json(dep)
    else:
        click.echo(dep["state"])


@deployments.command("events")
@click.argument("deployment_id")
@click.option("--follow/--no-follow", default=False, help="keep streaming until it ends")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line (every event)")
def deployments_events(deployment_id: str, follow: bool, as_json: bool) -> None:
    """A deployment's progress events.

    Build progress is summarised (each item's first and final record, and at most one every
    few seconds between); with --follow on a terminal it is shown as live bars.
    """
    with (
        _settings().client() as client,
        EventRenderer(sys.stdout, live=None if follow else False, full_time=True) as view,
    ):
        for ev in client.events(deployment_id, follow=follow):
            if ev.event == "end":
                break
            if as_json:
                click.echo(json.dumps(ev.data, sort_keys=True))
            else:
                view.event(ev.event, ev.data)


# --- keys -----------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--name", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def keys_create(name: str, as_json: bool) -> None:
    """Create an API key; it is printed once (stdout) and never shown again."""
    with _settings().client() as client:
        res = client.create_key(name)
    if as_json:
        print_json({"key": res["key"], "secret": res["secret"]})
        return
    err.print(
        f"created {res['key']['id']} ({name}); store it now, it is not shown again:",
        highlight=False,
    )
    click.echo(res["secret"])


@keys.command("ls")
@click.option("--json", "as_json", is_flag=True)
def keys_ls(as_json: bool) -> None:
    """Your customer's API keys (never their secrets)."""
    with _settings().client() as client:
        ks = client.list_keys()["keys"]
    if as_json:
        print_json(ks)
        return
    table(
        None,
        ["ID", "NAME", "HINT", "CREATED", "REVOKED"],
        [
            [k["id"], k["name"], k["hint"], _when(k["created_at"]), _when(k["revoked_at"])]
            for k in ks
        ],
    )


@keys.command("revoke")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True)
def keys_revoke(key_id: str, as_json: bool) -> None:
    """Revoke an API key at once."""
    with _settings().client() as client:
        res = client.revoke_key(key_id)
    if as_json:
        print_json(res["key"])
    else:
        err.print(f"revoked {key_id}", highlight=False)


# --- customers (admin) ----------------------------------------------------------------------------


@click.group()
def customers() -> None:
    """Operator commands (admin token): create and update customers."""


def _customer_rows(c: Json) -> list[list[Any]]:
    return [
        [k, c[k]]
        for k in (
            "id",
            "tenant_id",
            "name",
            "email",
            "pricing_tier",
            "discount_pct",
            "credit_balance",
        )
    ]


@customers.command("create")
@click.argument("name")
@click.option("--email")
@click.option("--tenant-id", help="add to an existing tenant (default: a new one)")
@click.option("--tier", "pricing_tier", help="pricing tier (free, standard, pro, enterprise)")
@click.option("--discount", help="discount in percent, e.g. 12.5")
@click.option("--credits", help="starting credit balance, e.g. 100.00")
@click.option("--no-key", is_flag=True, help="do not create a first API key")
@click.option("--json", "as_json", is_flag=True)
def customers_create(
    *,
    name: str,
    email: str | None,
    tenant_id: str | None,
    pricing_tier: str | None,
    discount: str | None,
    credits: str | None,
    no_key: bool,
    as_json: bool,
) -> None:
    """Create a customer (and a first API key, printed once)."""
    with _settings().client(need_key=False, need_admin=True) as client:
        res = client.create_customer(
            name,
            email=email,
            tenant_id=tenant_id,
            pricing_tier=pricing_tier,
            discount_pct=_decimal(discount, "discount"),
            credit_balance=_decimal(credits, "credits"),
            create_key=not no_key,
        )
    if as_json:
        print_json({k: res.get(k) for k in ("customer", "key", "secret")})
        return
    table(None, ["FIELD", "VALUE"], _customer_rows(res["customer"]))
    if res.get("secret"):
        err.print(
            "API key (shown once; `unkey login --api-key ...` or UNKEY_API_KEY):", highlight=False
        )
        click.echo(res["secret"])


@customers.command("update")
@click.argument("customer_id")
@click.option("--tier", "pricing_tier")
@click.option("--discount", help="discount in percent")
@click.option("--credits", help="set the credit balance")
@click.option("--add-credits", help="add to the credit balance (negative to remove)")
@click.option("--json", "as_json", is_flag=True)
def customers_update(
    *,
    customer_id: str,
    pricing_tier: str | None,
    discount: str | None,
    credits: str | None,
    add_credits: str | None,
    as_json: bool,
) -> None:
    """Change a customer's pricing tier, discount or credits."""
    with _settings().client(need_key=False, need_admin=True) as client:
        res = client.update_customer(
            customer_id,
            pricing_tier=pricing_tier,
            discount_pct=_decimal(discount, "discount"),
            credit_balance=_decimal(credits, "credits"),
            add_credits=_decimal(add_credits, "add-credits"),
        )
    if as_json:
        print_json(res["customer"])
    else:
        table(None, ["FIELD", "VALUE"], _customer_rows(res["customer"]))


@customers.command("ls")
@click.option("--json", "as_json", is_flag=True)
def customers_ls(as_json: bool) -> None:
    """All customers."""
    with _settings().client(need_key=False, need_admin=True) as client:
        cs = client.list_customers()["customers"]
    if as_json:
        print_json(cs)
        return
    table(
        None,
        ["ID", "NAME", "TENANT", "TIER", "DISCOUNT %", "CREDITS"],
        [
            [
                c["id"],
                c["name"],
                c["tenant_id"],
                c["pricing_tier"],
                c["discount_pct"],
                c["credit_balance"],
            ]
            for c in cs
        ],
    )


# --- hosts (admin) --------------------------------------------------------------------------------


@click.group()
def hosts() -> None:
    """Operator commands (admin token): the metald hosts, and forgetting a lost one."""


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}"


@hosts.command("ls")
@click.option("--json", "as_json", is_flag=True)
def hosts_ls(as_json: bool) -> None:
    """Every registered metald host: capacity, use, heartbeat age, lost or not, VMs by state."""
    with _settings().client(need_key=False, need_admin=True) as client:
        hs = client.list_hosts()["hosts"]
    if as_json:
        print_json(hs)
        return
    table(
        None,
        ["ID", "NAME", "DRIVER", "CPUS (USED)", "MEM GiB (USED)", "HEARTBEAT", "STATE", "VMS"],
        [
            [
                h["host_id"],
                h["name"],
                h["driver"],
                f"{h['cpus']} ({h['used_cpus']})",
                f"{_gib(h['memory_bytes'])} ({_gib(h['used_memory_bytes'])})",
                f"{h['heartbeat_age_s']:.1f} s ago",
                f"lost since {_when(h['lost_at'])}"
                if h["lost_at"]
                else ("live" if h["schedulable"] else "not schedulable"),
                " ".join(f"{k}={v}" for k, v in sorted(h["vms"].items())) or "-",
            ]
            for h in hs
        ],
    )


@hosts.command("forget")
@click.argument("host_id")
@click.option("--json", "as_json", is_flag=True)
def hosts_forget(host_id: str, as_json: bool) -> None:
    """Forget a lost host that is never coming back: its lost VMs' rows, their asset leases,
    its address leases and the host itself go. Refused (exit 5) for a live or late host."""
    with _settings().client(need_key=False, need_admin=True) as client:
        res = client.forget_host(host_id)["forgotten"]
    if as_json:
        print_json(res)
        return
    err.print(
        f"forgot host {res['name']} ({res['host_id']}): {len(res['vms'])} lost VM(s), "
        f"{res['asset_leases_released']} asset lease(s), {res['ip_leases_released']} address "
        "lease(s)",
        highlight=False,
    )


# --- login / whoami -------------------------------------------------------------------------------


@click.command()
@click.option("--api-url", help="gateway URL (default: UNKEY_API_URL or the local stack)")
@click.option("--api-key", help="API key (prompted for on a TTY when missing)")
@click.option("--ca-cert", type=click.Path(path_type=Path, dir_okay=False), help="CA certificate")
def login(api_url: str | None, api_key: str | None, ca_cert: Path | None) -> None:
    """Check an API key against the gateway and save it (mode 0600) for later commands."""
    current = _settings()
    api_url = api_url or current.api_url
    if not api_url:
        raise InvalidInput("no API URL", suggestion="pass --api-url or set UNKEY_API_URL")
    if not api_key:
        api_key = os.environ.get("UNKEY_API_KEY")
    if not api_key:
        if not sys.stdin.isatty():
            raise InvalidInput(
                "no API key given and stdin is not a terminal",
                suggestion="pass --api-key or set UNKEY_API_KEY",
            )
        api_key = click.prompt("API key", hide_input=True)
    ca = str(ca_cert.resolve()) if ca_cert else current.ca_cert
    settings = cli_config.ClientSettings(api_url, api_key, ca, None)
    with settings.client() as client:
        who = client.whoami()
    values = {"api_url": api_url, "api_key": api_key}
    if ca:
        values["ca_cert"] = ca
    path = cli_config.save(os.environ, values)
    err.print(
        f"logged in as {who['customer_id']} (tenant {who['tenant_id']}); saved {path}",
        highlight=False,
    )


@click.command()
@click.option("--json", "as_json", is_flag=True)
def whoami(as_json: bool) -> None:
    """Who the configured credentials belong to."""
    with _settings().client() as client:
        who = client.whoami()
    who.pop("request_id", None)
    if as_json:
        print_json(who)
    else:
        table(None, ["FIELD", "VALUE"], [[k, v] for k, v in who.items()])


# --- dev stack and services -----------------------------------------------------------------------


def _stack_settings(data_dir: Path, port: int | None, plain_http: bool) -> core_config.Settings:
    overrides: Json = {"data_dir": data_dir}
    gw: Json = {}
    if port is not None:
        gw["port"] = port
    if plain_http:
        gw["tls"] = False
    if gw:
        overrides["gateway"] = gw
    return core_config.load(environ=os.environ, **overrides)


_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path(".unkey"),
    show_default=True,
    help="where the stack keeps its state, logs and pid files",
)


@click.group()
def dev() -> None:
    """Run the whole platform locally as background processes."""


@dev.command("up")
@_data_dir_option
@click.option("--port", type=int, default=None, help="gateway port (default 8443)")
@click.option("--plain-http", is_flag=True, help="serve the gateway without TLS")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="seconds each service gets to become healthy",
)
def dev_up(data_dir: Path, port: int | None, plain_http: bool, timeout_s: float) -> None:
    """Start the local stack (first run: certificate, admin token, schema) and wait for health."""
    from ..dev.stack import Stack  # noqa: PLC0415

    stack = Stack(_stack_settings(data_dir, port, plain_http))
    statuses = stack.up(timeout_s=timeout_s)
    for st in statuses:
        err.print(
            f"{st.name:>10}  pid {st.pid}  "
            f"{'healthy' if st.healthy else 'UNHEALTHY'}  log {st.log}",
            highlight=False,
        )
    gw = next(s for s in statuses if s.name == "gatewayd")
    err.print(
        f"API: {gw.url}  (certificate {data_dir / 'tls' / 'gateway.crt'}, "
        f"admin token {data_dir / 'admin-token'})",
        highlight=False,
    )
    click.echo(gw.url)


@dev.command("down")
@_data_dir_option
@click.option(
    "--purge-vms",
    is_flag=True,
    help="also stop and delete this host's VMs (by default they keep running and are "
    "recovered by the next `dev up`)",
)
def dev_down(data_dir: Path, purge_vms: bool) -> None:
    """Stop the local stack gracefully (state stays in the data dir)."""
    from ..dev.stack import Stack  # noqa: PLC0415

    stopped = Stack(_stack_settings(data_dir, None, False)).down(purge_vms=purge_vms)
    err.print(f"stopped: {', '.join(stopped) or 'nothing was running'}", highlight=False)


@dev.command("status")
@_data_dir_option
@click.option("--json", "as_json", is_flag=True)
def dev_status(data_dir: Path, as_json: bool) -> None:
    """What runs in the local stack."""
    from ..dev.stack import Stack  # noqa: PLC0415

    stack = Stack(_stack_settings(data_dir, None, False))
    import json  # noqa: PLC0415

    state_file = data_dir / "stack.json"
    port = None
    if state_file.exists():
        url = json.loads(state_file.read_text()).get("api_url", "")
        port = int(url.rsplit(":", 1)[-1]) if url else None
        plain = url.startswith("http:")
        stack = Stack(_stack_settings(data_dir, port, plain))
    statuses = stack.status()
    if as_json:
        print_json([s.as_dict() for s in statuses])
    else:
        table(
            None,
            ["SERVICE", "RUNNING", "PID", "HEALTHY", "URL", "LOG"],
            [[s.name, s.running, s.pid, s.healthy, s.url, s.log] for s in statuses],
        )
    if not all(s.running for s in statuses):
        sys.exit(7)


@click.command()
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), help="TOML settings"
)
@_data_dir_option
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--plain-http", is_flag=True, help="serve without TLS")
@click.option("--database-url", default=None)
def gatewayd(
    *,
    config_file: Path | None,
    data_dir: Path,
    host: str | None,
    port: int | None,
    plain_http: bool,
    database_url: str | None,
) -> None:
    """Run gatewayd in the foreground."""
    from ..gateway.server import serve  # noqa: PLC0415

    overrides: Json = {"data_dir": data_dir}
    if database_url:
        overrides["database_url"] = database_url
    gw: Json = {}
    if host:
        gw["host"] = host
    if port is not None:
        gw["port"] = port
    if plain_http:
        gw["tls"] = False
    if gw:
        overrides["gateway"] = gw
    settings = core_config.load(config_file, environ=os.environ, **overrides)
    serve(settings)


def register(group: click.Group) -> None:
    """Add the API commands to the top-level group."""
    for cmd in (deploy, deployments, keys, customers, hosts, login, whoami, dev, gatewayd):
        group.add_command(cmd)
