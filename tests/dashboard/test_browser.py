"""The dashboard in headless Debian Chromium (Playwright) against a real gatewayd hosting billing:
usage goes in through ``unkey usage import`` (billaged -> JetStream -> aggregator -> chDB); the
page must log in with the API key and show what the API says."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import ConsoleMessage, Page, sync_playwright

from unkey_deploy.bus.server import NatsServer
from unkey_deploy.gateway.tls import client_context
from unkey_deploy.testing.gateway import RunningGateway, new_customer

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GIB = 1 << 30
VMS = ("vm_dash_web", "vm_dash_worker")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)"),
]


def _samples(customer_id: str, end_ns: int) -> list[dict[str, int | str]]:
    """Two VMs, 4.5 minutes at 10 Hz ending ``end_ns``: varying CPU, memory, network, disk."""
    out: list[dict[str, int | str]] = []
    n = 2700
    for k, vm in enumerate(VMS):
        cpu = rx = tx = rd = wr = 0
        for i in range(n):
            t = end_ns - (n - i) * 100_000_000
            load = 0.5 + 0.4 * math.sin(i / 300 + k)
            cpu += int(2 * 100_000_000 * load / (k + 1))
            rx += 40_000 * (k + 1)
            tx += 10_000
            rd += 5_000 * (i % 7)
            wr += 20_000
            out.append(
                {
                    "customer_id": customer_id,
                    "vm_id": vm,
                    "instance_id": "i1",
                    "vcpus": 2,
                    "memory_total_bytes": GIB,
                    "t": t,
                    "cpu_time_ns": cpu,
                    "memory_used_bytes": int(GIB * (0.3 + 0.2 * load)),
                    "net_rx_bytes": rx,
                    "net_tx_bytes": tx,
                    "disk_read_bytes": rd,
                    "disk_write_bytes": wr,
                }
            )
    return out


def _api(gw: RunningGateway, key: str, path: str) -> Any:
    r = httpx.get(
        gw.url + path,
        headers={"Authorization": f"Bearer {key}"},
        verify=client_context(gw.ca_cert),
        timeout=10,
    )
    r.raise_for_status()
    return r.json()


def _events(gw: RunningGateway, key: str, dep_id: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{gw.url}/v1/deployments/{dep_id}/events?follow=false",
        headers={"Authorization": f"Bearer {key}"},
        verify=client_context(gw.ca_cert),
        timeout=10,
    )
    r.raise_for_status()
    out = []
    for block in r.text.split("\n\n"):
        lines = dict(ln.split(": ", 1) for ln in block.splitlines() if ": " in ln)
        if "data" in lines and lines.get("event") != "end":
            out.append(json.loads(lines["data"]))
    return out


def _wait_for_usage(gw: RunningGateway, key: str, month: str) -> tuple[Any, Any]:
    # wait until every imported batch has landed: the bill no longer changes between two reads
    # (the aggregator consumes the import in several flushes)
    deadline = time.monotonic() + 90
    previous = None
    while True:
        usage = _api(gw, key, "/v1/usage?since=6h")
        inv = _api(gw, key, f"/v1/bill?month={month}")["invoice"]
        ready = {v["vm_id"] for v in usage["vms"]} == set(VMS) and inv["lines"] and usage["points"]
        if ready and inv == previous:
            return usage, inv
        previous = inv if ready else None
        assert time.monotonic() < deadline, f"usage never settled: {usage} {inv}"
        time.sleep(2.0)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _vm_row(v: dict[str, Any]) -> list[str]:
    return [
        v["vm_id"],
        f"{v['avg_cpu']:.1f} %",
        f"{v['max_cpu']:.1f} %",
        f"{_mib(v['max_memory_bytes'])} of {_mib(v['memory_total_bytes'])}",
        _mib(v["network_rx_bytes"] + v["network_tx_bytes"]),
        _mib(v["disk_read_bytes"] + v["disk_write_bytes"]),
    ]


def _chart_points(page: Page, selector: str) -> list[int]:
    counts: list[int] = page.eval_on_selector_all(
        selector,
        "cs => cs.map(c => { const ch = Chart.getChart(c);"
        " return ch && c.width > 0 && c.height > 0 ? ch.data.datasets[0].data.length : -1; })",
    )
    return counts


def test_dashboard_shows_what_the_api_says(
    billing_gateway: RunningGateway, nats_server: NatsServer, tmp_path: Path
) -> None:
    gw = billing_gateway
    cust = new_customer(gw)
    with gw.client(api_key=cust.key) as c:
        dep = c.deploy(
            {
                "name": "hello-dash",
                "image": "127.0.0.1:5055/examples/hello:1",
                "resources": {"cpu": 1, "memory": "256MiB"},
                "port": 8080,
            }
        )["deployment"]

    jsonl = tmp_path / "samples.jsonl"
    jsonl.write_text(
        "".join(json.dumps(s) + "\n" for s in _samples(cust.id, time.time_ns() - 5 * 10**9))
    )
    argv = [sys.executable, "-m", "unkey_deploy.cli.main", "usage", "import", str(jsonl)]
    r = subprocess.run(
        [*argv, "--nats-url", nats_server.url, "--json"],
        env=gw.cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    month = time.strftime("%Y-%m", time.gmtime())
    _usage, inv = _wait_for_usage(gw, cust.key, month)
    api_dep = _api(gw, cust.key, f"/v1/deployments/{dep['id']}")["deployment"]
    api_events = _events(gw, cust.key, dep["id"])
    assert api_events, "a deployment starts with an event"

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=ARGS,
            headless=True,
            ignore_https_errors=True,  # the gateway's self-signed certificate
            viewport={"width": 1200, "height": 900},
        )
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))

            # a wrong key is refused with a message, and not kept
            page.goto(gw.url + "/dashboard")
            page.fill("#api-key", "uk_not_a_real_key")
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#error:not([hidden])")
            assert "not accepted" in page.inner_text("#error")
            assert page.evaluate("sessionStorage.getItem('unkey.apiKey')") is None

            # from here on: no console errors at all
            def on_console(msg: ConsoleMessage) -> None:
                if msg.type == "error":
                    errors.append(f"console: {msg.text}")

            page.on("console", on_console)
            page.reload()
            page.fill("#api-key", cust.key)
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#app:not([hidden])")
            assert page.is_hidden("#login")
            assert page.evaluate("sessionStorage.getItem('unkey.apiKey')") == cust.key
            assert page.inner_text("#whoami") == cust.id

            # deployments: the one we made, as the API reports it
            row = page.wait_for_selector(f"#deployments tbody tr[data-id='{dep['id']}']")
            assert row is not None
            assert row.eval_on_selector(".name", "e => e.textContent") == api_dep["name"]
            assert row.eval_on_selector(".state", "e => e.textContent") == api_dep["state"]
            row.click()
            page.wait_for_selector("#deployment-detail:not([hidden])")
            detail = page.inner_text("#deployment-detail")
            assert api_dep["id"] in detail and api_dep["state"] in detail
            assert f"Events ({len(api_events)})" in detail
            shown_events = page.eval_on_selector_all(
                "#deployment-detail ol.events li", "ls => ls.map(l => l.textContent)"
            )
            assert [t.split(" ", 1)[1] for t in shown_events] == [
                f"{e['phase']}: {e['message']}" for e in api_events
            ]
            # no deployer runs here, so no VM was launched for it, and the page says so
            assert "no VM launched yet" in page.inner_text("#deployment-detail ul.dep-vms")

            # the bill: every line and the total, exactly as GET /v1/bill
            page.wait_for_selector("#bill tbody tr.line")
            shown = page.eval_on_selector_all(
                "#bill tbody tr.line",
                "rs => rs.map(r => [r.querySelector('.item').textContent,"
                " r.querySelector('.amount').textContent])",
            )
            assert shown == [[ln["item"], ln["amount"]] for ln in inv["lines"]]
            total = page.inner_text("#bill tfoot tr.total td.num")
            assert total == f"{inv['total']} {inv['currency']}"
            assert page.inner_text("#bill-month").startswith(month)

            # VMs: both in the table; each has a live chart fed by polling and a history chart
            page.wait_for_selector("#vms tbody tr[data-vm]")
            vms_shown = page.eval_on_selector_all(
                "#vms tbody tr[data-vm]", "rs => rs.map(r => r.dataset.vm)"
            )
            assert sorted(vms_shown) == sorted(VMS)
            # the table shows exactly what the page's last GET /v1/usage answered
            with page.expect_response(lambda r: "/v1/usage?" in r.url, timeout=15_000) as info:
                pass
            answer = info.value.json()
            page.wait_for_function(
                "u => document.querySelector('#usage-updated').dataset.until === u",
                arg=answer["until"],
            )
            rows = page.eval_on_selector_all(
                "#vms tbody tr[data-vm]",
                "rs => rs.map(r => [...r.cells].slice(0, 6).map(c => c.textContent))",
            )
            assert rows == [_vm_row(v) for v in answer["vms"]]
            page.wait_for_function(
                "() => [...document.querySelectorAll('canvas.live')].length === 2 &&"
                " [...document.querySelectorAll('canvas.live')].every(c =>"
                " Chart.getChart(c).data.labels.length >= 2)",
                timeout=20_000,
            )
            assert all(n >= 2 for n in _chart_points(page, "canvas.live"))
            assert all(n >= 1 for n in _chart_points(page, "canvas.history"))
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

            # the session survives a reload (sessionStorage), and logging out forgets the key
            page.reload()
            page.wait_for_selector("#app:not([hidden])")
            page.wait_for_selector(f"#deployments tbody tr[data-id='{dep['id']}']")
            page.wait_for_selector("canvas.live")
            page.click("#logout")
            assert page.is_visible("#login-form")
            assert page.evaluate("sessionStorage.getItem('unkey.apiKey')") is None
        finally:
            browser.close()
    assert errors == []
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
