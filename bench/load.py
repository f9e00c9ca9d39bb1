"""Mixed load on one machine, against a real local stack (issue 8).

    .venv/bin/python bench/load.py --minutes 10 [--vms 10000] [--customers 100]

For ``--minutes`` (default 10), all at once:

- **metering**: ``--vms`` simulated VMs (``metering.sim.SimFleet``, deterministic samples, time
  shifted to now) sampled at 10 Hz in real time by this process's billaged (journal + spool),
  publishing 600-sample batches to the stack's nats-server; the stack's aggregator (in gatewayd)
  stores them in its chDB. The VMs belong to ``--customers`` real customers (created through the
  admin API) so nothing is quarantined as unknown.
- **deploys**: the example app deployed every ``--deploy-every-s`` (a new image each time, so a
  real build), each followed to ``running``; once more than ``--keep`` run, the oldest is
  stopped (``DELETE /v1/deployments/{id}``) and followed to ``stopped``, as a user replacing
  old versions would (the host's capacity is finite).
- **status reads**: ``GET /v1/deployments/{id}`` and ``GET /v1/deployments`` (``--reads-per-s``).
- **dashboard queries**: ``/v1/usage?since=1h`` and ``/v1/bill`` of a random simulated customer
  with its own key, and the operator's ``/v1/usage/capacity`` (``--queries-per-s``).

Then every series is stopped (partial batches flushed), the spool drained, the aggregator's
consumer caught up, the stack stopped, and its chDB read: each simulated VM that produced ``n``
samples must have exactly ``n`` interval rows in ``metrics_raw`` (BILLING.md: a row per sample,
the first counted from boot, each later one from the sample before), at exactly the timestamps
the simulator produced. ``samples_lost`` = produced samples with no row, ``samples_duplicated`` =
rows beyond one per produced sample (plus any simulated sample quarantined).

``errors`` counts HTTP answers other than 2xx, transport errors, deploys that did not reach
``running``, stops that did not reach ``stopped`` and a failed ``unkey dev down --purge-vms``;
``p99_ms`` is over every HTTP request.
Last line: ``RESULT errors=... p99_ms=... samples_lost=... samples_duplicated=... ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import numpy as np

from unkey_deploy.bus.jetstream import connect
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.config import BusConfig
from unkey_deploy.core.net import free_port
from unkey_deploy.dev.example import REPO as HELLO_REPO
from unkey_deploy.dev.example import hello_image
from unkey_deploy.gateway.tls import client_context
from unkey_deploy.metering import stream as mstream
from unkey_deploy.metering.billaged import Billaged
from unkey_deploy.metering.model import SeriesKey
from unkey_deploy.metering.sim import T0, TICK_NS, SimFleet
from unkey_deploy.testing import images

REPO_DIR = Path(__file__).resolve().parents[1]
UNKEY = [sys.executable, "-m", "unkey_deploy.cli.main"]


class LocalStack:
    """``unkey dev up`` in a data dir of its own (sandbox VMs), stopped with its VMs purged."""

    def __init__(self) -> None:
        # "unkey" in the path (dev/stack.py trusts such pids); 0755: VMs run as nobody
        self.root = Path(tempfile.mkdtemp(prefix="unkey-load-"))
        self.root.chmod(0o755)
        self.data_dir = self.root / "unkey-stack"
        self.data_dir.mkdir(mode=0o755)
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_")}
        self.env.update(
            UNKEY_DATA_DIR=str(self.data_dir),
            UNKEY_CONFIG_HOME=str(self.root / "config"),
            UNKEY_METALD__DRIVER="sandbox",
            UNKEY_METALD__SUBNET=f"10.{random.randrange(64, 250)}.{random.randrange(256)}.0/24",
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*UNKEY, *args], cwd=REPO_DIR, env=self.env, capture_output=True, text=True,
            timeout=600, check=False,
        )  # fmt: skip

    def up(self) -> None:
        p = self.cli("dev", "up", "--data-dir", str(self.data_dir), "--port", str(self.port))
        if p.returncode != 0:
            raise SystemExit(f"`unkey dev up` failed: {p.stderr}")

    def down(self) -> str | None:
        """``unkey dev down --purge-vms``: the services stop gracefully (the aggregator commits
        what it holds), metald deleting its VMs first. Returns why it failed, or None."""
        p = self.cli("dev", "down", "--purge-vms", "--data-dir", str(self.data_dir))
        return None if p.returncode == 0 else f"`unkey dev down --purge-vms`: {p.stderr.strip()}"

    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{int((self.data_dir / 'nats' / 'port').read_text())}"

    def registry(self) -> str:
        return f"127.0.0.1:{int((self.data_dir / 'registry' / 'port').read_text())}"

    def client(self, token: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{self.port}",
            verify=client_context(self.data_dir / "tls" / "gateway.crt"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            limits=httpx.Limits(max_connections=32),
        )


class Load:
    def __init__(self, st: LocalStack, args: argparse.Namespace) -> None:
        self.st = st
        self.args = args
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []
        self.deploys_ok = 0
        self.stops_ok = 0
        self.deployments: list[str] = []
        self.running: list[str] = []
        self.stop = asyncio.Event()

    async def call(self, client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            r = await client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            self.errors.append(f"{method} {url}: {exc!r}")
            return None
        finally:
            self.latencies_ms.append((time.perf_counter() - t0) * 1000)
        if not 200 <= r.status_code < 300:
            self.errors.append(f"{method} {url}: {r.status_code} {r.text[:300]}")
            return None
        return r.json()

    async def deploys(self, user: httpx.AsyncClient) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            www = self.st.root / f"www-{n}"
            www.mkdir()
            (www / "index.html").write_text(f"<p>load {n}</p>\n")
            tag = f"load{n}"
            await asyncio.to_thread(
                images.push, self.st.registry(), HELLO_REPO, tag, hello_image(www)
            )
            spec = {
                "name": f"load-{n}",
                "image": f"{self.st.registry()}/{HELLO_REPO}:{tag}",
                "resources": {"cpu": 1, "memory": "64MiB", "disk": "128MiB"},
                "port": 8080,
            }
            body = await self.call(user, "POST", "/v1/deploy", json=spec)
            if body is not None:
                dep_id = body["deployment"]["id"]
                self.deployments.append(dep_id)
                if await self.follow(user, dep_id, "running", 300):
                    self.deploys_ok += 1
                    self.running.append(dep_id)
            while len(self.running) > self.args.keep:
                old = self.running.pop(0)
                if await self.call(user, "DELETE", f"/v1/deployments/{old}") is not None and (
                    await self.follow(user, old, "stopped", 120)
                ):
                    self.stops_ok += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.args.deploy_every_s)

    async def follow(self, user: httpx.AsyncClient, dep_id: str, want: str, timeout: float) -> bool:
        """Poll the deployment until it is ``want``; an error (counted) if it fails or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = await self.call(user, "GET", f"/v1/deployments/{dep_id}")
            state = got and got["deployment"]["state"]
            if state == want:
                return True
            if state in ("failed", "cancelled"):
                self.errors.append(f"deployment {dep_id}: {got['deployment'].get('error')}")
                return False
            await asyncio.sleep(1)
        self.errors.append(f"deployment {dep_id}: not {want} after {timeout:.0f} s")
        return False

    async def reads(self, user: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            if self.deployments:
                dep = random.choice(self.deployments)
                await self.call(user, "GET", f"/v1/deployments/{dep}")
            await self.call(user, "GET", "/v1/deployments", params={"limit": 20})
            await asyncio.sleep(2 / self.args.reads_per_s)

    async def queries(self, customers: list[httpx.AsyncClient], admin: httpx.AsyncClient) -> None:
        i = 0
        while not self.stop.is_set():
            c = random.choice(customers)
            await self.call(c, "GET", "/v1/usage", params={"since": "1h"})
            await self.call(c, "GET", "/v1/bill")
            i += 1
            if i % 10 == 0:
                await self.call(admin, "GET", "/v1/usage/capacity", params={"days": 1})
            await asyncio.sleep(2 / self.args.queries_per_s)


def meter(
    st: LocalStack, args: argparse.Namespace, cust_ids: list[str], stop: threading.Event
) -> tuple[Billaged, SimFleet, int, int]:
    """10 Hz real time until ``stop``, in a thread of its own (its own event loop, so making
    10,000 VMs' samples does not delay the HTTP clients); returns billaged, the fleet, ticks
    done and the time shift applied to the simulator's samples."""
    return asyncio.run(_meter(st, args, cust_ids, stop))


async def _meter(
    st: LocalStack, args: argparse.Namespace, cust_ids: list[str], stop: threading.Event
) -> tuple[Billaged, SimFleet, int, int]:
    fleet = SimFleet(args.vms, seed=args.seed)
    fleet.keys = [
        SeriesKey(cust_ids[i % len(cust_ids)], k.vm_id, k.instance_id, k.vcpus,
                  k.memory_total_bytes)
        for i, k in enumerate(fleet.keys)
    ]  # fmt: skip
    shift = (time.time_ns() // TICK_NS) * TICK_NS - T0
    url = st.nats_url()

    async def factory() -> object:
        return await connect(url)

    b = Billaged(
        st.root / "sim-spool",
        bus_factory=factory,  # type: ignore[arg-type]
        bus_config=BusConfig(),
        publish_chunk=4000,
        capacity=args.vms,
    )
    slots = np.array([b.slot(k) for k in fleet.keys])
    publisher = asyncio.create_task(b.run_publisher(idle_s=0.05))
    k = 0
    t_start = time.monotonic()
    while not stop.is_set():
        rows = fleet.rows(k)
        rows[:, 0] += shift
        b.ingest(slots, rows)
        k += 1
        delay = t_start + k * 0.1 - time.monotonic()
        await asyncio.sleep(max(0.0, delay))
    for key in fleet.keys:
        b.stop(key)
    b.stop_publisher()
    await publisher
    if not await b.drain(600):
        raise SystemExit("the simulator's spool did not drain in 600 s")
    await b.close()
    return b, fleet, k, shift


async def caught_up(url: str, timeout_s: float) -> bool:
    """The stream's consumers (the aggregator's) have nothing pending nor unacked."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            infos = await js.consumers_info(mstream.STREAM_NAME)
            if infos and all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos):
                return True
            await asyncio.sleep(1)
        return False
    finally:
        await nc.close()


async def run(st: LocalStack, args: argparse.Namespace) -> dict[str, Any]:
    admin_token = (st.data_dir / "admin-token").read_text().strip()
    admin = st.client(admin_token)
    load = Load(st, args)
    cust_ids: list[str] = []
    customer_clients: list[httpx.AsyncClient] = []
    for j in range(args.customers):
        body = await load.call(admin, "POST", "/v1/customers", json={"name": f"load-{j}"})
        if body is None:
            raise SystemExit(f"cannot create customers: {load.errors[-1]}")
        cust_ids.append(body["customer"]["id"])
        customer_clients.append(st.client(body["secret"]))
    load.latencies_ms.clear()  # set-up is not the load
    user = customer_clients[0]
    load_avg: list[float] = []

    async def sample_load() -> None:
        while not load.stop.is_set():
            load_avg.append(os.getloadavg()[0])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(load.stop.wait(), 10)

    t0 = time.monotonic()
    meter_stop = threading.Event()
    metering = asyncio.create_task(asyncio.to_thread(meter, st, args, cust_ids, meter_stop))
    tasks = [
        asyncio.create_task(load.deploys(user)),
        asyncio.create_task(load.reads(user)),
        asyncio.create_task(load.queries(customer_clients, admin)),
        asyncio.create_task(sample_load()),
    ]
    await asyncio.sleep(args.minutes * 60)
    load.stop.set()
    meter_stop.set()
    await asyncio.gather(*tasks)
    b, fleet, ticks, shift = await metering
    elapsed = time.monotonic() - t0
    print(f"load done after {elapsed:.0f} s; {ticks} ticks of {args.vms} VMs", file=sys.stderr)
    if not await caught_up(st.nats_url(), 600):
        load.errors.append("the aggregator did not catch up within 600 s")
    for c in [admin, *customer_clients]:
        await c.aclose()
    lat = np.array(load.latencies_ms or [0.0])
    return {
        "errors": len(load.errors),
        "error_examples": load.errors[:5],
        "p99_ms": float(np.percentile(lat, 99)),
        "p50_ms": float(np.percentile(lat, 50)),
        "requests": len(load.latencies_ms),
        "deploys": load.deploys_ok,
        "stops": load.stops_ok,
        "ticks": ticks,
        "shift": shift,
        "fleet": fleet,
        "samples_produced": int(b.stats.accepted),
        "rejected": int(b.stats.rejected),
        "load_avg_1m": max(load_avg) if load_avg else os.getloadavg()[0],
        "load_avg_mean": sum(load_avg) / len(load_avg) if load_avg else 0.0,
    }


def compare(store: ChdbStorage, fleet: SimFleet, ticks: int, shift: int) -> tuple[int, int]:
    """(lost, duplicated) samples of the simulated VMs, exactly: per VM, the distinct timestamps
    stored must be the simulator's samples k = 0..ticks-1 (count, and sum of their milliseconds),
    each stored once. A row at a time the simulator never produced, or a quarantined simulated
    sample, counts as duplicated (billed wrong either way)."""
    got = store.query(
        "SELECT vm_id, count() AS n, uniqExact(timestamp) AS u, "
        "sumDistinct(toUnixTimestamp64Milli(timestamp)) AS s FROM metrics_raw "
        "WHERE vm_id LIKE 'vm_sim%' GROUP BY vm_id"
    )
    q = "SELECT count() AS n FROM metrics_quarantine WHERE vm_id LIKE 'vm_sim%'"
    quarantined = int(store.query(q)[0]["n"])
    by_vm = {r["vm_id"]: r for r in got}
    want_sum = np.zeros(len(fleet.keys), dtype=np.int64)
    for k in range(ticks):
        want_sum += (fleet.rows(k)[:, 0] + shift) // 1_000_000
    lost = dup = 0
    for i, key in enumerate(fleet.keys):
        r = by_vm.get(key.vm_id)
        n, u, s = (int(r["n"]), int(r["u"]), int(r["s"])) if r else (0, 0, 0)
        dup += (n - u) + max(0, u - ticks)
        lost += max(0, ticks - u)
        if u == ticks and s != int(want_sum[i]):
            lost += 1  # as many timestamps, other ones: one missing and one foreign at least
    return lost, dup + quarantined


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--customers", type=int, default=100)
    ap.add_argument("--deploy-every-s", type=float, default=30)
    ap.add_argument("--keep", type=int, default=4, help="deployments left running")
    ap.add_argument("--reads-per-s", type=float, default=20)
    ap.add_argument("--queries-per-s", type=float, default=4)
    ap.add_argument("--seed", type=int, default=8)
    args = ap.parse_args()
    st = LocalStack()
    try:
        st.up()
        out = asyncio.run(run(st, args))
        problem = st.down()  # gatewayd's chDB is ours to read once it stopped
        if problem is not None:
            out["errors"] += 1
            out["error_examples"].append(problem)
        store = ChdbStorage(st.data_dir / "clickhouse")
        try:
            lost, dup = compare(store, out["fleet"], out["ticks"], out["shift"])
        finally:
            store.close()
    finally:
        st.down()
        shutil.rmtree(st.root, ignore_errors=True)
    print(json.dumps({k: v for k, v in out.items() if k not in ("fleet",)}, indent=1),
          file=sys.stderr)  # fmt: skip
    print(
        f"RESULT errors={out['errors']} p99_ms={out['p99_ms']:.1f} samples_lost={lost} "
        f"samples_duplicated={dup} minutes={args.minutes:g} vms={args.vms} "
        f"samples={out['samples_produced']} requests={out['requests']} "
        f"deploys={out['deploys']} stops={out['stops']} p50_ms={out['p50_ms']:.1f} "
        f"load_avg_max={out['load_avg_1m']:.1f} load_avg_mean={out['load_avg_mean']:.1f}"
    )


if __name__ == "__main__":
    main()
