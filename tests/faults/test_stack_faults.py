"""kill -9 each service of a real local stack during active work, restart it, and check what a
user and the bill would see (issue 8).

One stack per module (tests/e2e's CLI-driven ``Stack``, sandbox driver, 5 s metering batches),
shared by the tests below in file order (``xdist_group``: one worker runs them all). Each test
leaves the stack healthy for the next. Where the services live here:

- gatewayd: the API, the deploy acceptance, and the billing aggregator (-> chDB);
- builderd: builds; the asset manager is a library inside builderd (writes assets) and
  metald (leases them), it has no process of its own to kill;
- metald (hostd): the VMs' supervisor and the metering loop with billaged (journal + spool);
- deployer: turns accepted deployments into builds and VMs;
- nats-server: JetStream between billaged and the aggregator.

Counting samples exactly: the reference is every sample of the customer in the JetStream stream
(read with a consumer of our own; billaged publishes each batch with its batch id as
``Nats-Msg-Id``), deduplicated by (instance, t); the aggregator must store each of them once:
the per-VM sample count ``unkey usage`` reads from ClickHouse equals it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.test_journey import (  # tests/ is on sys.path
    Stack,
    _alive,
    _on_host,
    _poll,
    _stream_samples,
)
from unkey_deploy.billing.service import ACK_WAIT_S
from unkey_deploy.dev.example import REPO as HELLO_REPO
from unkey_deploy.dev.example import hello_image
from unkey_deploy.gateway.tls import client_context
from unkey_deploy.testing import images
from unkey_deploy.testing.subnets import reserved_subnet

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.xdist_group("faults-stack")]

TICK_NS = 100_000_000


@dataclass
class Env:
    st: Stack
    tmp: Path
    customer_id: str
    dep: dict[str, Any]  # the deployment running since the start (metered throughout)
    downtimes: list[tuple[int, int]]  # metald down windows (ns): the only gaps allowed

    def api(self) -> httpx.Client:
        cert = self.st.data_dir / "tls" / "gateway.crt"
        return httpx.Client(
            base_url=f"https://127.0.0.1:{self.st.port}",
            verify=client_context(cert),
            headers={"Authorization": f"Bearer {self.st.api_key}"},
            timeout=30,
        )

    def push(self, tag: str, big_mib: int = 0) -> str:
        """A fresh image (own content, so its own digest: the build is not a cache hit);
        ``big_mib`` of random bytes make its build last long enough to be interrupted."""
        www = self.tmp / f"www-{tag}"
        www.mkdir()
        (www / "index.html").write_text(f"<p>{tag}</p>\n")
        if big_mib:
            (www / "big.bin").write_bytes(os.urandom(big_mib << 20))
        images.push(self.st.registry(), HELLO_REPO, tag, hello_image(www))
        return f"{self.st.registry()}/{HELLO_REPO}:{tag}"

    def spec(self, name: str, image: str) -> dict[str, Any]:
        return {
            "name": name,
            "image": image,
            "resources": {"cpu": 1, "memory": "128MiB", "disk": "256MiB"},
            "port": 8080,
            "healthcheck": {"path": "/", "interval_s": 5, "timeout_s": 2},
        }

    def deployment(self, dep_id: str) -> dict[str, Any]:
        return dict(self.st.unkey_json("deployments", "show", dep_id))

    def wait_state(self, dep_id: str, want: str, timeout_s: float = 150) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            d = self.deployment(dep_id)
            assert d["state"] not in ({"failed", "cancelled"} - {want}), d
            return d if d["state"] == want else None

        return _poll(f"deployment {dep_id} to be {want}", ready, timeout_s)

    def vms(self, dep_id: str) -> list[dict[str, Any]]:
        """metald's rows for the deployment (read-only, straight from the control database)."""
        with contextlib.closing(sqlite3.connect(self.st.data_dir / "control.db", timeout=30)) as c:
            c.row_factory = sqlite3.Row
            rows = c.execute(
                "SELECT vm_id, state, instance_id, runtime, error FROM metald_vms "
                "WHERE deployment_id = ? ORDER BY created_at",
                (dep_id,),
            ).fetchall()
        return [{**dict(r), "runtime": json.loads(r["runtime"] or "null")} for r in rows]

    def kill9(self, service: str) -> int:
        pid = self.st.pid(service)
        assert pid is not None and _alive(pid), f"{service} is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, f"{service} survived SIGKILL"
            time.sleep(0.02)
        return time.time_ns()

    def restart(self) -> None:
        """``unkey dev up`` starts what is not running (what an operator does after a crash)."""
        _up(self.st)
        for name in ("gatewayd", "builderd", "metald", "deployer", "nats-server"):
            assert self.st.pid(name) is not None, f"{name} not running after `dev up`"


def _up(st: Stack) -> None:
    """``dev up`` (tries twice itself), once more on a machine so loaded that a service missed
    its 60 s to become healthy twice: `dev up` is idempotent, an operator would run it again."""
    try:
        st.up()
    except pytest.fail.Exception:
        time.sleep(3)
        st.up()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("faults")
    subnet = contextlib.ExitStack()
    st = Stack(tmp, "sandbox", subnet.enter_context(reserved_subnet()))
    try:
        _up(st)
        created = st.unkey_json("customers", "create", f"faults-{uuid.uuid4().hex[:8]}")
        st.api_key = created["secret"]
        e = Env(st, tmp, created["customer"]["id"], {}, [])
        app = tmp / "app.yaml"
        app.write_text(json.dumps(e.spec("faults-base", e.push("base"))))
        e.dep = st.unkey_json("deploy", str(app), "--wait", timeout_s=180)
        assert e.dep["state"] == "running", e.dep
        yield e
    finally:
        vm_ids, parents = _vms_and_cgroup_parent(st)
        st.down()
        leftovers = st.leftovers()
        # the VMs too: a VM's processes do not name the data dir, so st.leftovers() misses
        # them; any VM cgroup left keeps metald's parent cgroup of this stack
        on_host = _on_host(vm_ids, st.subnet, parents)
        shutil.rmtree(st.root, ignore_errors=True)
        subnet.close()
    assert leftovers == [], "processes of the stack survived `dev down` and SIGKILL"
    assert parents, "metald's cgroup parent of the stack was not found: the check saw nothing"
    assert on_host == {k: [] for k in on_host}, f"left on the host by the stack: {on_host}"


def _vms_and_cgroup_parent(st: Stack) -> tuple[list[str], set[str]]:
    """The VMs the stack records and metald's cgroup parent of its VMs (unkey-metald-<tag>,
    the tag of dev/stack's metald: its host id and subnet)."""
    host_id = (st.data_dir / "metald" / "host_id").read_text().strip()
    tag = hashlib.sha1(f"{host_id}|{st.subnet}".encode(), usedforsecurity=False).hexdigest()[:8]
    parents = {str(Path(d) / n) for d, subdirs, _ in os.walk("/sys/fs/cgroup") for n in subdirs
               if n == f"unkey-metald-{tag}"}  # fmt: skip
    return st.vm_ids(), parents


def _get(url: str) -> int:
    try:
        return httpx.get(url + "/", timeout=5).status_code
    except httpx.HTTPError:
        return 0


# -- gatewayd ---------------------------------------------------------------------------------


def test_gatewayd_kill9_right_after_202_the_deploy_still_completes(env: Env) -> None:
    image = env.push("gw")
    with env.api() as api:
        r = api.post("/v1/deploy", json=env.spec("faults-gw", image))
    assert r.status_code == 202, r.text
    dep_id = r.json()["deployment"]["id"]
    env.kill9("gatewayd")  # the client holds an id: the platform must not forget it
    env.restart()
    dep = env.wait_state(dep_id, "running")
    assert _get(dep["url"]) == 200


# -- builderd ---------------------------------------------------------------------------------


def test_builderd_kill9_mid_build_the_build_is_retried_and_finishes(env: Env) -> None:
    image = env.push("build", big_mib=32)
    with env.api() as api:
        r = api.post("/v1/deploy", json=env.spec("faults-build", image))
    assert r.status_code == 202, r.text
    dep_id = r.json()["deployment"]["id"]

    def messages() -> list[str]:  # the deployment's events, read fast (no CLI start-up)
        with contextlib.closing(sqlite3.connect(env.st.data_dir / "control.db", timeout=30)) as c:
            rows = c.execute(
                "SELECT message FROM deployment_events WHERE deployment_id = ? ORDER BY id",
                (dep_id,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def started() -> bool | None:  # a builder worker holds the job
        return True if any(m.startswith("attempt 1/") for m in messages()) else None

    _poll("the build to start", started, 60, 0.05)
    env.kill9("builderd")
    assert not any(m.startswith("asset ready") for m in messages()), "build ended before kill"
    env.restart()
    dep = env.wait_state(dep_id, "running", timeout_s=180)  # the lease (30 s) expires first
    assert _get(dep["url"]) == 200
    seen = messages()
    assert any(m.startswith("attempt 2/") for m in seen), seen  # retried from scratch


# -- metald (and billaged inside it) ----------------------------------------------------------


def test_metald_kill9_vms_survive_and_are_recovered(env: Env) -> None:
    dep_id = env.dep["id"]
    before = [v for v in env.vms(dep_id) if v["state"] == "running"]
    assert len(before) == 1, env.vms(dep_id)
    killed = env.kill9("metald")
    assert _get(env.dep["url"]) == 200, "the VM stopped answering when its supervisor died"
    time.sleep(2)  # some ticks without metald
    env.restart()
    env.downtimes.append((killed, time.time_ns()))
    time.sleep(3)  # a reconcile pass
    after = env.vms(dep_id)
    assert [(v["vm_id"], v["instance_id"], v["state"]) for v in after] == [
        (before[0]["vm_id"], before[0]["instance_id"], "running")
    ], after
    assert after[0]["runtime"]["pid"] == before[0]["runtime"]["pid"]  # re-attached, not rebooted
    assert _get(env.dep["url"]) == 200


def test_metald_sigterm_restart_vms_survive_and_metering_goes_on(env: Env) -> None:
    """A graceful restart (an upgrade): the VM runs on, the next metald re-attaches it and its
    metering continues the same series (the exact count below allows a gap only while metald
    was down). A metald that retired the series on SIGTERM died at its next start."""
    dep_id = env.dep["id"]
    before = [v for v in env.vms(dep_id) if v["state"] == "running"]
    assert len(before) == 1, env.vms(dep_id)
    pid = env.st.pid("metald")
    assert pid is not None
    stopped = time.time_ns()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _alive(pid):
        assert time.monotonic() < deadline, "metald ignored SIGTERM"
        time.sleep(0.05)
    assert _get(env.dep["url"]) == 200, "the VM stopped with its supervisor"
    env.restart()
    env.downtimes.append((stopped, time.time_ns()))
    time.sleep(3)  # some ticks of metering and a reconcile pass
    new_pid = env.st.pid("metald")
    assert new_pid is not None and _alive(new_pid), "metald died after its restart"
    after = env.vms(dep_id)
    assert [(v["vm_id"], v["instance_id"], v["state"]) for v in after] == [
        (before[0]["vm_id"], before[0]["instance_id"], "running")
    ], after
    assert after[0]["runtime"]["pid"] == before[0]["runtime"]["pid"]


# -- aggregator (gatewayd) and nats-server, then the exact count ------------------------------


_CH_ROWS = """
import json, sys
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
st = ChdbStorage(sys.argv[1])
rows = st.query(
    "SELECT vm_id, instance_id, toUnixTimestamp64Milli(timestamp) AS ms FROM metrics_raw "
    "WHERE customer_id = {c:String}", {"c": sys.argv[2]})
print(json.dumps([[r["vm_id"], r["instance_id"], int(r["ms"])] for r in rows]))
st.close()
"""


def _clickhouse_rows(env: Env) -> list[tuple[str, str, int]]:
    """Every interval row of the customer in gatewayd's chDB: stop gatewayd (SIGTERM: the
    aggregator commits what it holds), read the store in a process of its own, restart it."""
    pid = env.st.pid("gatewayd")
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < deadline, "gatewayd ignored SIGTERM"
        time.sleep(0.05)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _CH_ROWS, str(env.st.data_dir / "clickhouse"),
             env.customer_id],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    finally:
        env.restart()
    return [(vm, inst, ms) for vm, inst, ms in json.loads(out)]


def _series(samples: list[Any]) -> dict[tuple[str, str], list[int]]:
    by: dict[tuple[str, str], set[int]] = {}
    for s in samples:
        by.setdefault((s.vm_id, s.instance_id), set()).add(s.t)
    return {k: sorted(v) for k, v in by.items()}


def test_aggregator_and_nats_kill9_no_sample_lost_or_counted_twice(env: Env) -> None:
    """ClickHouse holds one interval row per sample, stamped with its time (BILLING.md: the first
    sample of an instance counts from boot, each later one from the sample before): every
    streamed sample has exactly one row, none has a row without a streamed sample, and the
    instance's series has no hole except while metald was down."""
    time.sleep(6)  # a batch or two in flight
    env.kill9("gatewayd")  # the aggregator dies between fetch, insert and ack
    time.sleep(3)
    env.restart()
    env.kill9("nats-server")  # billaged keeps spooling; the aggregator reconnects
    last_kill = time.monotonic()
    time.sleep(6)
    env.restart()
    # the spool drains, the aggregator catches up: a batch a killed process had fetched and
    # not acknowledged comes back only after the ack wait, and the batches after it wait for it
    time.sleep(max(8.0, ACK_WAIT_S + 5 - (time.monotonic() - last_kill)))
    streamed = _series(asyncio.run(_stream_samples(env.st.nats_url(), env.customer_id))[0])
    rows = _clickhouse_rows(env)
    counted = Counter(rows)
    twice = {k: n for k, n in counted.items() if n > 1}
    assert twice == {}, f"rows stored more than once: {list(twice.items())[:5]}"
    stored: dict[tuple[str, str], set[int]] = {}
    for vm, inst, ms in counted:
        stored.setdefault((vm, inst), set()).add(ms)
    assert sum(len(ts) for ts in streamed.values()) > 200  # ~ 10 a second since the deploy
    for series, ts in streamed.items():
        want = {t // 1_000_000 for t in ts}
        have = stored.get(series, set())
        # rows stored after the stream snapshot was read may be newer: compare up to it
        have_upto = {ms for ms in have if ms <= ts[-1] // 1_000_000}
        assert want <= have_upto, f"{series}: {len(want - have_upto)} streamed samples not stored"
        extra = sorted(have_upto - want)
        assert extra == [], f"{series}: {len(extra)} stored samples not in the stream: {extra[:5]}"
        for a, b in itertools.pairwise(ts):
            if b - a > 3 * TICK_NS:
                assert any(lo - 2 * TICK_NS <= a and b <= hi + 30 * 10**9
                           for lo, hi in env.downtimes), (series, a, b, env.downtimes)  # fmt: skip


# -- a VM process killed from outside ---------------------------------------------------------


def test_vm_killed_from_outside_fails_and_billing_stops_then(env: Env) -> None:
    dep_id = env.dep["id"]
    (vm,) = [v for v in env.vms(dep_id) if v["state"] == "running"]
    os.kill(int(vm["runtime"]["pid"]), signal.SIGKILL)
    killed_ns = time.time_ns()

    def failed() -> dict[str, Any] | None:
        row = next(v for v in env.vms(dep_id) if v["vm_id"] == vm["vm_id"])
        return row if row["state"] == "failed" else None

    row = _poll("metald to mark the killed VM failed", failed, 60, 0.5)
    assert row["error"], row
    time.sleep(8)  # its last batch is flushed
    samples, _ = asyncio.run(_stream_samples(env.st.nats_url(), env.customer_id))
    mine = [s.t for s in samples if s.instance_id == vm["instance_id"]]
    assert mine, "no sample of the VM at all"
    assert max(mine) <= killed_ns, f"sampled {(max(mine) - killed_ns) / 1e6:.0f} ms after kill"
