"""``unkey usage`` and ``unkey bill`` (through the gateway API), ``unkey usage import`` (an
operator tool that publishes samples through billaged -> JetStream, like live metering)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..core.errors import InvalidInput
from . import config as cli_config
from .output import err, print_json, table

Json = dict[str, Any]


def _net_mb(row: Json) -> float:
    return (int(row.get("network_rx_bytes", 0)) + int(row.get("network_tx_bytes", 0))) / 2**20


def _settings() -> cli_config.ClientSettings:
    return cli_config.resolve()


@click.group(invoke_without_command=True)
@click.option("--vm", "vm_id", default=None, help="only this VM")
@click.option("--since", default="1h", show_default=True, help="window: 30m, 6h, 7d")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def usage(ctx: click.Context, vm_id: str | None, since: str, as_json: bool) -> None:
    """Your VMs' usage: now (last 5 minutes) and per 5 minutes since --since."""
    if ctx.invoked_subcommand is not None:
        return
    params: Json = {"since": since}
    if vm_id:
        params["vm"] = vm_id
    with _settings().client() as client:
        body: Json = client.request("GET", "/v1/usage", params=params).json()
    body.pop("request_id", None)
    if as_json:
        print_json(body)
        return
    table(
        "VMs, last 5 minutes",
        ["VM", "AVG CPU %", "MAX MEMORY GB", "NETWORK MB", "SAMPLES"],
        [
            [
                v.get("vm_id"),
                f"{float(v.get('avg_cpu', 0)):.1f}",
                f"{int(v.get('max_memory_bytes', 0)) / 2**30:.3f}",
                f"{_net_mb(v):.3f}",
                v.get("samples", ""),
            ]
            for v in body.get("vms", [])
        ],
    )
    table(
        f"Usage since {body.get('since', '')[:19]}",
        ["BUCKET", "VM", "AVG CPU %", "P95 CPU %", "MAX MEM GB", "NET MB", "GAP S"],
        [
            [
                str(p.get("t", ""))[:19].replace("T", " "),
                p.get("vm_id"),
                f"{float(p.get('avg_cpu', 0)):.1f}",
                f"{float(p.get('p95_cpu', 0)):.1f}",
                f"{int(p.get('max_memory_bytes', 0)) / 2**30:.3f}",
                f"{_net_mb(p):.3f}",
                f"{int(p.get('gap_ns', 0)) / 1e9:.1f}",
            ]
            for p in body.get("points", [])
        ],
    )


@usage.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--nats-url", default=None, help="NATS URL (default: $UNKEY_NATS_URL)")
@click.option(
    "--spool-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="billaged spool for imports (default: <data dir>/usage-import)",
)
@click.option("--json", "as_json", is_flag=True)
def usage_import(file: Path, nats_url: str | None, spool_dir: Path | None, as_json: bool) -> None:
    """Operator: send JSON Lines of raw samples through billaged -> JetStream -> billing."""
    # imported here: billaged/nats are heavy and only this operator command needs them
    from ..billing.importer import import_file_sync  # noqa: PLC0415

    url = nats_url or os.environ.get("UNKEY_NATS_URL")
    if not url:
        raise InvalidInput(
            "no NATS URL", suggestion="pass --nats-url nats://127.0.0.1:4222 or set UNKEY_NATS_URL"
        )
    if spool_dir is None:
        spool_dir = Path(os.environ.get("UNKEY_DATA_DIR", ".unkey")) / "usage-import"
    report = import_file_sync(file, nats_url=url, spool_dir=spool_dir)
    if as_json:
        print_json(report.to_json())
        return
    err.print(
        f"imported {report.samples_accepted} samples of {report.series} series in "
        f"{report.batches_published} batches ({report.samples_rejected} rejected, "
        f"{report.duplicates} already sent)"
    )


@click.command("bill")
@click.option("--month", default=None, help="YYYY-MM (UTC); default: this month")
@click.option("--customer", "customer_id", default=None, help="operator: any customer's bill")
@click.option(
    "--finalize",
    is_flag=True,
    help="operator (with --customer and --month): issue the month's invoice (numbered, frozen, "
    "credits taken once); idempotent",
)
@click.option("--issued", "list_issued", is_flag=True, help="list the issued invoices instead")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="also write the invoice as an HTML document",
)
def bill(  # noqa: PLR0917 (one option each)
    month: str | None,
    customer_id: str | None,
    finalize: bool,
    list_issued: bool,
    as_json: bool,
    html_file: Path | None,
) -> None:
    """Your invoice for a month: line items, subtotal, discount, credits and total.

    A month's invoice is a draft until an operator issues it (--finalize); after that it never
    changes, and usage of that month that arrives later shows as adjustment lines on the next
    month's invoice."""
    params: Json = {}
    if month:
        params["month"] = month
    settings = _settings()
    if list_issued:
        _list_issued(settings, customer_id, as_json)
        return
    if finalize:
        if not customer_id or not month:
            raise InvalidInput(
                "--finalize needs --customer and --month",
                suggestion="e.g. unkey bill --customer cus_... --month 2026-10 --finalize",
            )
        with settings.client(need_key=False, need_admin=True) as client:
            body: Json = client.request(
                "POST", f"/v1/customers/{customer_id}/invoices/{month}/finalize", admin=True
            ).json()
        if not body["issued_now"]:
            err.print(f"{month} was already issued as {body['invoice']['number']} (unchanged)")
        else:
            err.print(f"issued {body['invoice']['number']}")
    if customer_id:
        with settings.client(need_key=False, need_admin=True) as client:
            inv: Json = client.request(
                "GET", f"/v1/customers/{customer_id}/bill", admin=True, params=params
            ).json()["invoice"]
            if html_file:
                html = client.request(
                    "GET",
                    f"/v1/customers/{customer_id}/bill",
                    admin=True,
                    params={**params, "month": inv["month"], "html": "true"},
                ).text
                html_file.write_text(html)
    else:
        with settings.client() as client:
            inv = client.request("GET", "/v1/bill", params=params).json()["invoice"]
            if html_file:
                html_file.write_text(
                    client.request("GET", f"/v1/invoices/{inv['month']}.html").text
                )
    if html_file:
        err.print(f"wrote {html_file}")
    if as_json:
        print_json(inv)
        return
    status = inv.get("status", "draft")
    title = f"Invoice {inv['customer_id']} {inv['month']} ({inv['currency']})"
    title += (
        f", {inv['number']} issued {str(inv['issued_at'])[:10]}"
        if inv.get("number")
        else (f", {status}")
    )
    extra = []
    if inv.get("credit_added") and inv["credit_added"] not in ("0", "0.00"):
        extra = [["added to credit balance", "", "", f"${inv['credit_added']}"]]
    table(
        title,
        ["ITEM", "QUANTITY", "UNIT PRICE", "AMOUNT"],
        [
            [
                (f"adjustment {ln['adjustment_for']}: " if ln.get("adjustment_for") else "")
                + f"{ln['item']} ({ln['pricing_version']})",
                f"{ln['quantity']} {ln['unit']}",
                f"${ln['unit_price']}",
                f"${ln['amount']}",
            ]
            for ln in inv["lines"]
        ]
        + [
            ["subtotal", "", "", f"${inv['subtotal']}"],
            [f"discount ({inv['discount_pct']}%)", "", "", f"-${inv['discount']}"],
            ["credits applied", "", "", f"-${inv['credits_applied']}"],
            ["total", "", "", f"${inv['total']}"],
            *extra,
        ],
    )


def _list_issued(
    settings: cli_config.ClientSettings, customer_id: str | None, as_json: bool
) -> None:
    if customer_id:
        with settings.client(need_key=False, need_admin=True) as client:
            body: Json = client.request(
                "GET", f"/v1/customers/{customer_id}/invoices", admin=True
            ).json()
    else:
        with settings.client() as client:
            body = client.request("GET", "/v1/invoices").json()
    rows = body["invoices"]
    if as_json:
        print_json(rows)
        return
    table(
        "Issued invoices",
        ["NUMBER", "MONTH", "ISSUED", "CREDITS", "TOTAL"],
        [
            [
                r["number"],
                r["month"],
                str(r["issued_at"])[:10],
                f"${r['credits_applied']}",
                f"${r['total']}",
            ]
            for r in rows
        ],
    )


def register(group: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    group.add_command(usage)
    group.add_command(bill)
