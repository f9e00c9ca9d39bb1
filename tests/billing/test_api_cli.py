"""The whole path an operator and a customer see: `unkey usage import` (billaged -> JetStream)
-> aggregator -> chDB -> gatewayd billing routes -> `unkey bill` / `unkey usage`, tenant-scoped."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy.orm import Session

from unkey_deploy.billing.aggregator import Aggregator, Incoming
from unkey_deploy.billing.customers import SqlDirectory
from unkey_deploy.billing.http import router
from unkey_deploy.billing.ledger import InvoiceLedger
from unkey_deploy.billing.queries import BillingQueries
from unkey_deploy.billing.service import LoopStats, run_consumer
from unkey_deploy.bus.jetstream import connect
from unkey_deploy.bus.server import NatsServer
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core import config
from unkey_deploy.core.clock import FakeClock
from unkey_deploy.core.net import free_port
from unkey_deploy.gateway.app import create_app
from unkey_deploy.metering.codec import encode
from unkey_deploy.metering.model import SeriesKey
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db

from .reference import reference_invoices
from .scenarios import big_series, make_series, raw_of, to_batches

HOUR = 3_600_000_000_000
ADMIN = "admin-token-for-tests"


@pytest.fixture
def served(tmp_path: Path, storage: ChdbStorage) -> Iterator[tuple[str, dict[str, str], Path]]:
    settings = config.load(data_dir=tmp_path / "data", gateway={"tls": False})
    (tmp_path / "data").mkdir()
    engine = db.make_engine(settings.resolved_database_url)
    db.upgrade(engine)
    factory = db.session_factory(engine)
    keys = {}
    with Session(engine) as s:
        for name, pct, bal in (("acme", "20.00", "1.00"), ("globex", "0", "0")):
            c = cp.create_customer(
                s, name, now=time.time(), discount_pct=Decimal(pct), credit_balance=Decimal(bal)
            )
            _k, plain = cp.create_api_key(s, c.id, now=time.time())
            keys[c.id] = plain
        s.commit()
    app = create_app(settings, routers=[router], factory=factory, admin_token=ADMIN)
    now_ns = (time.time_ns() // HOUR) * HOUR + 30 * 60 * 10**9
    clock = FakeClock(now_ns)
    app.state.billing = BillingQueries(
        storage, SqlDirectory(factory), clock, InvoiceLedger(factory, clock)
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", keys, tmp_path
    finally:
        server.should_exit = True
        th.join(10)
        engine.dispose()


def _unkey(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unkey_deploy.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_import_then_bill_and_usage_through_api_and_cli(
    served: tuple[str, dict[str, str], Path], storage: ChdbStorage, nats_server: NatsServer
) -> None:
    url, keys, tmp = served
    a, b = sorted(keys)
    rng = random.Random(21)
    now_hour = time.time_ns() // HOUR * HOUR
    series = [
        make_series(rng, a, "vm_a1", "i1", now_hour - 200 * 10**9, 3000, gap_every=700),
        make_series(rng, b, "vm_b1", "i1", now_hour - 100 * 10**9, 1200, vcpus=1),
    ]
    raw = raw_of(series)
    jsonl = tmp / "samples.jsonl"
    jsonl.write_text("".join(json.dumps(r.__dict__) + "\n" for r in reversed(raw)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_")}
    env.update(UNKEY_API_URL=url, UNKEY_CONFIG_HOME=str(tmp / "cfg"), UNKEY_DATA_DIR=str(tmp / "d"))

    # a bad file is refused before anything is sent, naming the line and field
    bad = tmp / "bad.jsonl"
    bad.write_text(jsonl.read_text().splitlines()[0] + "\n" + '{"vm_id": "x"}\n')
    r = _unkey(env, "usage", "import", str(bad), "--nats-url", nats_server.url)
    assert r.returncode == 2 and "line 2" in r.stderr and "missing" in r.stderr

    r = _unkey(env, "usage", "import", str(jsonl), "--nats-url", nats_server.url, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["samples_accepted"] == len(raw) and report["series"] == 2

    async def drain() -> None:
        bus = await connect(nats_server.url)
        agg = Aggregator(
            storage,
            SqlDirectory(
                db.session_factory(db.make_engine(f"sqlite:///{tmp / 'data' / 'control.db'}"))
            ),
        )
        stop = asyncio.Event()
        stats = LoopStats()
        task = asyncio.create_task(run_consumer(bus, agg, stop, ack_wait_s=5, stats=stats))
        deadline = time.monotonic() + 60
        while stats.samples < len(raw) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stop.set()
        await task
        await bus.close()
        assert stats.samples == len(raw)

    asyncio.run(drain())

    ref = reference_invoices(raw, {a: (Fraction(20), Fraction(1)), b: (Fraction(0), Fraction(0))})
    month = time.strftime("%Y-%m", time.gmtime(now_hour // 10**9))
    # customer A with its own key: its bill, to the cent
    r = _unkey(
        {**env, "UNKEY_API_KEY": keys[a]},
        "bill",
        "--month",
        month,
        "--json",
        "--html",
        str(tmp / "inv.html"),
    )
    assert r.returncode == 0, r.stderr
    inv = json.loads(r.stdout)
    assert inv["customer_id"] == a
    assert Fraction(inv["total"]) == ref[(a, month)]["total"]
    assert Fraction(inv["discount"]) == ref[(a, month)]["discount"]
    assert {ln["item"]: Fraction(ln["amount"]) for ln in inv["lines"]} == ref[(a, month)]["lines"]
    assert a in (tmp / "inv.html").read_text() and "Total" in (tmp / "inv.html").read_text()
    # operator: customer B's invoice with the admin token
    r = _unkey(
        {**env, "UNKEY_ADMIN_TOKEN": ADMIN}, "bill", "--customer", b, "--month", month, "--json"
    )
    assert r.returncode == 0, r.stderr
    assert Fraction(json.loads(r.stdout)["total"]) == ref[(b, month)]["total"]
    # A's key never sees B: the customer comes from the key; B's route needs the admin token
    r = _unkey(
        {**env, "UNKEY_API_KEY": keys[a], "UNKEY_ADMIN_TOKEN": keys[a]},
        "bill",
        "--customer",
        b,
        "--month",
        month,
        "--json",
    )
    assert r.returncode != 0
    # usage: A's VMs only
    r = _unkey({**env, "UNKEY_API_KEY": keys[a]}, "usage", "--since", "2h", "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert {p["vm_id"] for p in body["points"]} == {"vm_a1"}
    # bad input: a clear error
    r = _unkey({**env, "UNKEY_API_KEY": keys[a]}, "bill", "--month", "2026-13")
    assert r.returncode == 2 and "YYYY-MM" in r.stderr


def test_finalize_through_api_and_cli_is_operator_only_and_tenant_scoped(
    served: tuple[str, dict[str, str], Path], storage: ChdbStorage
) -> None:
    url, keys, tmp = served
    a, b = sorted(keys)
    now_hour = time.time_ns() // HOUR * HOUR
    this_month = time.strftime("%Y-%m", time.gmtime(now_hour // 10**9))
    y, m = map(int, this_month.split("-"))
    last = f"{y - (m == 1):04d}-{(m - 2) % 12 + 1:02d}"
    start = int(time.mktime(time.strptime(last + "-03", "%Y-%m-%d")) - time.timezone) * 10**9
    rng = random.Random(23)
    series = [big_series(rng, SeriesKey(a, "vm_a1", "i1", 16, 64 * 2**30), start, 120)]
    factory = db.session_factory(db.make_engine(f"sqlite:///{tmp / 'data' / 'control.db'}"))
    agg = Aggregator(storage, SqlDirectory(factory))
    batches = [encode(bt) for bt in to_batches(series[0])]
    out = agg.process([Incoming(i, data) for i, data in enumerate(batches)])
    assert out.term == [] and len(out.ack) == len(batches)
    ref = reference_invoices(raw_of(series), {a: (Fraction(20), Fraction(1))})[(a, last)]

    env = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_")}
    env.update(UNKEY_API_URL=url, UNKEY_CONFIG_HOME=str(tmp / "cfg"), UNKEY_DATA_DIR=str(tmp / "d"))
    admin = {**env, "UNKEY_ADMIN_TOKEN": ADMIN}
    # a customer's key cannot issue invoices (its own or anyone's)
    r = httpx.post(
        f"{url}/v1/customers/{a}/invoices/{last}/finalize",
        headers={"Authorization": f"Bearer {keys[a]}"},
    )
    assert r.status_code in (401, 403)
    # the month in progress cannot be issued
    r = _unkey(admin, "bill", "--customer", a, "--month", this_month, "--finalize", "--json")
    assert r.returncode == 5 and "before the month is over" in r.stderr
    r = _unkey(admin, "bill", "--customer", a, "--month", last, "--finalize", "--json")
    assert r.returncode == 0, r.stderr
    inv = json.loads(r.stdout)
    assert inv["status"] == "issued" and inv["number"].startswith("INV-")
    assert Fraction(inv["total"]) == ref["total"]
    assert Fraction(inv["credits_applied"]) == ref["credits"] == 1
    # again: the same invoice (HTTP 200, not 201), credits not taken twice
    r2 = httpx.post(
        f"{url}/v1/customers/{a}/invoices/{last}/finalize",
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert r2.status_code == 200 and r2.json()["invoice"] == inv
    with factory() as s:
        assert cp.get_customer(s, a).credit_balance == 0
    # the customer sees it with its own key; B sees none of A's invoices
    r = _unkey({**env, "UNKEY_API_KEY": keys[a]}, "bill", "--issued", "--json")
    assert r.returncode == 0, r.stderr
    assert [(i["number"], i["month"]) for i in json.loads(r.stdout)] == [(inv["number"], last)]
    r = _unkey({**env, "UNKEY_API_KEY": keys[a]}, "bill", "--month", last, "--json")
    assert json.loads(r.stdout) == inv
    r = _unkey({**env, "UNKEY_API_KEY": keys[b]}, "bill", "--issued", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = _unkey({**env, "UNKEY_API_KEY": keys[a]}, "bill", "--month", last)
    assert inv["number"] in r.stdout
