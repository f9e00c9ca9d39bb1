"""The whole journey, as a user runs it (issue 7): ``unkey dev up`` -> push an image -> create a
customer -> ``unkey deploy --wait`` -> the app answers from its VM -> samples -> JetStream ->
aggregator -> chDB -> ``unkey bill`` shows a non-zero cost that equals an independent reference
computed from every raw batch in the stream (tests/billing/reference.py, BILLING.md).

Each test starts its own stack in a tmp data dir on free ports and a reserved subnet, with 5 s
metering batches, and stops it with ``unkey dev down --purge-vms`` whatever happens. The test
itself purges its stack running a few VMs that way and checks nothing of them is left on the
host: no process, cgroup, mount, network namespace or nftables table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from billing.reference import RawSample, reference_invoices, series_usage  # tests/ is on sys.path
from unkey_deploy.assets.service import open_assets
from unkey_deploy.builder.api import BuildProgress
from unkey_deploy.bus import connect
from unkey_deploy.core import config as core_config
from unkey_deploy.core.net import free_port
from unkey_deploy.dev.example import push_hello
from unkey_deploy.dev.stack import recorded_vms
from unkey_deploy.metald.api import Scheduler
from unkey_deploy.metering.codec import decode
from unkey_deploy.metering.stream import STREAM_NAME, consumer_spec
from unkey_deploy.store import db
from unkey_deploy.testing.subnets import reserved_subnet

REPO = Path(__file__).resolve().parents[2]
UNKEY = [sys.executable, "-m", "unkey_deploy.cli.main"]
BIG_MIB = 64  # served by the app and fetched twice: ~0.125 GB of network, $0.01 at $0.10/GB
T = TypeVar("T")

pytestmark = [pytest.mark.slow, pytest.mark.root]


def _poll(what: str, fn: Callable[[], T | None], timeout_s: float, every_s: float = 1.0) -> T:
    """``fn()`` until it returns something other than None; fails naming ``what`` and the last
    value seen after ``timeout_s`` (generous: CI shares 2 cores between many processes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


class Stack:
    """One local stack driven only through the real ``unkey`` CLI, like a user would."""

    def __init__(self, tmp: Path, driver: str, subnet: str) -> None:
        # "unkey" in the path: `dev status`/`dev down` only trust pids whose command line says
        # unkey (dev/stack.py _is_ours), and nats-server/registry only name the data dir.
        # Not under pytest's tmp (0700): metald runs the VMs as `nobody`, which must reach the
        # files metald prepares for them under the data dir.
        self.root = Path(tempfile.mkdtemp(prefix="unkey-e2e-"))
        self.root.chmod(0o755)
        self.data_dir = self.root / "unkey-stack"
        self.data_dir.mkdir(mode=0o755)
        self.port = free_port()
        self.subnet = subnet
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("UNKEY_") and k not in ("XDG_CONFIG_HOME",)
        }
        self.env.update(
            UNKEY_DATA_DIR=str(self.data_dir),
            UNKEY_CONFIG_HOME=str(tmp / "config"),
            UNKEY_METERING__BATCH_SAMPLES="50",
            UNKEY_METALD__DRIVER=driver,
            UNKEY_METALD__SUBNET=subnet,
        )
        self.api_key: str | None = None

    def unkey(self, *args: str, timeout_s: float = 120, key: bool = True) -> str:
        env = dict(self.env)
        if key and self.api_key:
            env["UNKEY_API_KEY"] = self.api_key
        proc = subprocess.run(
            [*UNKEY, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert proc.returncode == 0, (
            f"`unkey {' '.join(args)}` exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
        )
        return proc.stdout

    def unkey_fails(self, *args: str, api_key: str) -> subprocess.CompletedProcess[str]:
        """Run ``unkey`` with another key, expecting it to fail."""
        proc = subprocess.run(
            [*UNKEY, *args],
            cwd=REPO,
            env={**self.env, "UNKEY_API_KEY": api_key},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode != 0, proc.stdout
        return proc

    def unkey_json(self, *args: str, timeout_s: float = 120) -> Any:
        return json.loads(self.unkey(*args, "--json", timeout_s=timeout_s))

    def up(self) -> str:
        """``unkey dev up``. Each service gets 120 s to become healthy; on a machine shared with
        other test runs one may miss that, and `dev up` is idempotent (it starts only what is
        not running), so a second `dev up` is what a user would do. Logs go into the failure."""
        argv = [*UNKEY, "dev", "up", "--data-dir", str(self.data_dir), "--port", str(self.port)]
        errors = ""
        for _attempt in range(2):
            proc = subprocess.run(
                argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=300,
                check=False,
            )  # fmt: skip
            if proc.returncode == 0:
                return proc.stdout.strip().splitlines()[-1]
            errors += f"exit {proc.returncode}: {proc.stderr}"
        logs = "".join(
            f"\n--- {f.name}:\n{f.read_text(errors='replace')[-1500:]}"
            for f in sorted((self.data_dir / "logs").glob("*.log"))
        )
        pytest.fail(f"`unkey dev up` failed twice: {errors}{logs}")

    def pid(self, name: str) -> int | None:
        try:
            return int((self.data_dir / "run" / f"{name}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def down(self) -> subprocess.CompletedProcess[str] | None:
        """``unkey dev down --purge-vms`` (None if it hung), then kill whatever of this data dir
        is still running (a service that ignored SIGTERM), so a failed test leaves nothing."""
        proc = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc = subprocess.run(
                [*UNKEY, "dev", "down", "--purge-vms", "--data-dir", str(self.data_dir)],
                cwd=REPO, env=self.env, capture_output=True, text=True, timeout=240, check=False,
            )  # fmt: skip
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)
        return proc

    def leftovers(self) -> list[int]:
        """Processes whose command line, environment or working dir is in this stack's data dir."""
        needle = str(self.data_dir.resolve()).encode()
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if (
                    needle in (p / "cmdline").read_bytes()
                    or needle in (p / "environ").read_bytes()
                    or os.readlink(p / "cwd").startswith(str(self.data_dir.resolve()))
                ):
                    out.append(int(p.name))
            except OSError:
                continue
        return [pid for pid in out if _alive(pid)]

    def vm_ids(self) -> list[str]:
        """Every VM the stack's database records."""
        engine = db.make_engine(core_config.load(environ=self.env).resolved_database_url)
        try:
            return [str(v.vm_id) for v in Scheduler(engine).list()]
        finally:
            engine.dispose()

    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{int((self.data_dir / 'nats' / 'port').read_text())}"

    def registry(self) -> str:
        return f"127.0.0.1:{int((self.data_dir / 'registry' / 'port').read_text())}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Callable[[str], Stack]]:
    started: list[Stack] = []
    with contextlib.ExitStack() as subnets:

        def make(driver: str) -> Stack:
            st = Stack(tmp_path, driver, subnets.enter_context(reserved_subnet()))
            started.append(st)
            return st

        yield make
        for st in started:
            st.down()
            assert st.leftovers() == [], "processes of the stack survived `dev down` and SIGKILL"
            for _ in range(20):  # a service's last write may land while we delete
                shutil.rmtree(st.root, ignore_errors=True)
                if not st.root.exists():
                    break
                time.sleep(0.5)


def _on_host(vm_ids: list[str], subnet: str, cgroup_parents: set[str]) -> dict[str, list[str]]:
    """What of these VMs, and of the metald that ran them on ``subnet``, exists on the host now:
    processes whose command line names a VM (bwrap, qemu: ``-name``), cgroup directories named
    after a VM or in ``cgroup_parents`` (metald's parent of its VMs' cgroups), mounts under
    /run/unkey-metald/<vm>, network namespaces of a VM, and the nftables tables of the subnet
    (the NAT table masquerades it; its filter table bears the same name without ``_nat``)."""
    ulids = [v.removeprefix("vm_").lower() for v in vm_ids]

    def ours(text: str) -> bool:
        return any(u in text.lower() for u in ulids)

    procs = []
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if p.name.isdigit() and ours(cmd):
                procs.append(f"{p.name} {cmd[:120]}")
    cgroups = [str(Path(d) / n) for d, subdirs, _ in os.walk("/sys/fs/cgroup") for n in subdirs
               if ours(n) or str(Path(d) / n) in cgroup_parents]  # fmt: skip
    mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()
              if "/run/unkey-metald/" in ln and ours(ln.split()[1])]  # fmt: skip
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    netns = [ln.split()[0] for ln in listed.stdout.splitlines() if ln and ours(ln.split()[0])]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    nft = []
    for fam, name in (ln.split()[1:3] for ln in tables.stdout.splitlines() if ln.strip()):
        rules = subprocess.run(["nft", "list", "table", fam, name], capture_output=True,
                               text=True, check=False).stdout  # fmt: skip
        if f"ip saddr {subnet} " in rules:
            nft.append(f"{fam} {name}")
            inet = name.removesuffix("_nat")
            if f"table inet {inet}\n" in tables.stdout + "\n":
                nft.append(f"inet {inet}")
    return {"processes": procs, "cgroups": cgroups, "mounts": mounts, "netns": netns, "nft": nft}


def _purge_leaves_nothing(st: Stack, *, driver: str, vms: int) -> None:
    """``unkey dev down --purge-vms`` on the running stack, which runs ``vms`` VMs: nothing of
    them is left on the host afterwards (checked against what was there before the purge)."""
    vm_ids = st.vm_ids()
    assert len(vm_ids) == vms == recorded_vms(core_config.load(environ=st.env)), vm_ids
    before = _on_host(vm_ids, st.subnet, set())
    # the check sees what a VM holds: each VM's process and cgroup, and the stack's tables;
    # a sandbox also its rootfs mounts and its network namespace (QEMU uses a tap)
    expected = ("processes", "cgroups", "mounts", "netns", "nft") if driver == "sandbox" else (
        "processes", "cgroups", "nft")  # fmt: skip
    for what in expected:
        assert before[what], f"no {what} of the VMs seen before the purge: {before}"
    assert all(any(v.lower() in c.lower() for c in before["cgroups"]) for v in vm_ids), before
    parents = {str(Path(c).parent) for c in before["cgroups"]}
    assert all("/unkey-metald-" in p for p in parents), parents

    t0 = time.monotonic()
    proc = st.down()
    assert proc is not None, "`unkey dev down --purge-vms` hung"
    assert proc.returncode == 0, proc.stderr
    assert "metald" in proc.stderr, proc.stderr
    after = _on_host(vm_ids, st.subnet, parents)
    assert after == {k: [] for k in after}, (
        f"left on the host after `dev down --purge-vms` ({time.monotonic() - t0:.1f} s): {after}"
    )


# -- the independent reference ----------------------------------------------------------------


async def _stream_samples(nats_url: str, customer_id: str) -> tuple[list[RawSample], int]:
    """Every sample of ``customer_id`` in the JetStream stream, read with a consumer of our own
    (limits retention: the aggregator's acks remove nothing); and how many batches held them."""
    bus = await connect(nats_url, name="e2e-reference")
    samples: list[RawSample] = []
    batches = 0
    try:
        durable = f"e2e-ref-{uuid.uuid4().hex[:12]}"
        consumer = await bus.consumer(STREAM_NAME, consumer_spec(durable=durable))
        try:
            total = await bus.stream_message_count(STREAM_NAME)
            seen = 0
            while seen < total:
                msgs = await consumer.fetch(256, timeout_s=5.0)
                if not msgs:
                    break
                for m in msgs:
                    seen += 1
                    batch = decode(m.data)
                    await m.ack()
                    k = batch.key
                    if k.customer_id != customer_id:
                        continue
                    batches += 1
                    samples += [
                        RawSample(
                            k.customer_id,
                            k.vm_id,
                            k.instance_id,
                            k.vcpus,
                            k.memory_total_bytes,
                            s.t,
                            s.cpu_time_ns,
                            s.memory_used_bytes,
                            s.net_rx_bytes,
                            s.net_tx_bytes,
                            s.disk_read_bytes,
                            s.disk_write_bytes,
                        )
                        for s in batch.samples
                    ]
            assert seen >= total, f"read {seen} of the stream's {total} messages"
        finally:
            await consumer.close()
    finally:
        await bus.close()
    return samples, batches


def _q6(x: Fraction) -> Decimal:
    return Decimal(round(x * 10**6)) / 10**6  # half-even, like the invoice's display


def _dec(x: Fraction) -> Decimal:
    return Decimal(x.numerator) / x.denominator


def _reference_view(
    samples: list[RawSample], customer_id: str, month: str, customer: tuple[Fraction, Fraction]
) -> dict[str, Any]:
    """The invoice the reference computes: {item: (quantity to 6 decimals, amount)}, total."""
    ref = reference_invoices(samples, {customer_id: customer})
    inv = ref[(customer_id, month)]
    cpu = mem = net = 0
    by_series: dict[tuple[str, str], list[RawSample]] = {}
    for s in samples:
        by_series.setdefault((s.vm_id, s.instance_id), []).append(s)
    for ss in by_series.values():
        months, _valid, _invalid = series_usage(ss)
        u = months.get(month, {"cpu": 0, "mem": 0, "net": 0})
        cpu, mem, net = cpu + u["cpu"], mem + u["mem"], net + u["net"]
    qty = {
        "vcpu": Fraction(cpu, 3_600_000_000_000),
        "memory": Fraction(mem, 3_600_000_000_000 * 2**30),
        "network": Fraction(net, 2**30),
    }
    return {
        "lines": {item: (_q6(qty[item]), _dec(inv["lines"][item])) for item in qty},
        "total": _dec(inv["total"]),
    }


def _bill_view(inv: dict[str, Any]) -> dict[str, Any]:
    return {
        "lines": {
            ln["item"]: (Decimal(ln["quantity"]), Decimal(ln["amount"]))
            for ln in inv["lines"]
            if ln["item"] in ("vcpu", "memory", "network")
        },
        "total": Decimal(inv["total"]),
    }


# -- the journey ------------------------------------------------------------------------------


def _journey(st: Stack, tmp: Path, *, driver: str, deploy_timeout_s: float) -> str:
    """The journey; returns the app's image reference."""
    api_url = st.up()
    assert api_url == f"https://127.0.0.1:{st.port}"

    def status() -> list[dict[str, Any]]:
        proc = subprocess.run(
            [*UNKEY, "dev", "status", "--data-dir", str(st.data_dir), "--json"],
            cwd=REPO, env=st.env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode in (0, 7), proc.stderr  # 7: something is down
        return list(json.loads(proc.stdout))

    first = status()
    assert {s["name"] for s in first} >= {"nats-server", "registry", "gatewayd", "builderd",
                                          "metald", "deployer"}  # fmt: skip
    down = [s["name"] for s in first if not (s["running"] and s["healthy"])]
    tails = {n: (st.data_dir / "logs" / f"{n}.log").read_text(errors="replace")[-3000:]
             for n in down}  # fmt: skip
    assert not down, (first, tails)  # a service that died after `dev up`, with its log

    # the example app, with a large (but highly compressible) file so the bill is not $0.00
    www = tmp / "www"
    www.mkdir()
    index = (REPO / "examples" / "hello" / "www" / "index.html").read_bytes()
    (www / "index.html").write_bytes(index)
    (www / "big.bin").write_bytes(b"\0" * (BIG_MIB << 20))
    ref = push_hello(st.registry(), www)
    assert ref == f"{st.registry()}/examples/hello:1"

    created = st.unkey_json("customers", "create", f"e2e-{uuid.uuid4().hex[:8]}")
    customer_id = created["customer"]["id"]
    st.api_key = created["secret"]
    assert st.api_key and st.api_key.startswith("uk_")
    assert st.unkey_json("whoami")["customer_id"] == customer_id

    app = tmp / "app.yaml"
    app.write_text(
        "name: e2e-web\n"
        f"image: {ref}\n"
        "resources: {cpu: 1, memory: 256MiB, disk: 512MiB}\n"
        "port: 8080\n"
        "healthcheck: {path: /, interval_s: 5, timeout_s: 2}\n"
    )
    st.unkey("validate", str(app))
    dep = st.unkey_json("deploy", str(app), "--wait", timeout_s=deploy_timeout_s)
    assert dep["state"] == "running", dep
    url = dep["url"]
    assert url and url.startswith("http://"), dep

    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200
    assert page.content == index
    for _ in range(2):
        big = httpx.get(f"{url}/big.bin", timeout=120)
        assert big.status_code == 200
        assert len(big.content) == BIG_MIB << 20

    shown = st.unkey_json("deployments", "show", dep["id"])
    assert shown["id"] == dep["id"] and shown["state"] == "running"
    events = st.unkey("deployments", "events", dep["id"])
    assert "running" in events

    # usage reaches ClickHouse (5 s batches -> JetStream -> aggregator in gatewayd -> chDB),
    # the downloads above with the batch of the samples taken after them
    def vm_with_downloads() -> dict[str, Any] | None:
        body = st.unkey_json("usage", "--since", "1h")
        vms = [v for v in body.get("vms", []) if int(v.get("samples", 0)) > 0
               and int(v["network_rx_bytes"]) + int(v["network_tx_bytes"])
               >= 2 * (BIG_MIB << 20)]  # fmt: skip
        return vms[0] if vms else None

    vm = _poll("`unkey usage` to show the VM's samples and downloads", vm_with_downloads, 120)
    vm_id = vm["vm_id"]
    # the running VM holds a lease on its rootfs asset, so asset gc can never delete it
    asset_ids = [json.loads(line)["data"].get("asset_id") for line in
                 st.unkey("deployments", "events", dep["id"], "--json").splitlines()]  # fmt: skip
    asset_id = next(a for a in asset_ids if a)
    assets = open_assets(core_config.load(environ=st.env))
    assert vm_id in {lease.holder for lease in assets.leases(asset_id)}

    # the bill equals the reference over every raw batch in the stream; new batches keep
    # arriving while the VM runs, so poll until a bill and a stream snapshot agree
    last: dict[str, Any] = {}

    def agreeing_bill() -> tuple[dict[str, Any], int, dict[str, Any]] | None:
        samples, batches = asyncio.run(_stream_samples(st.nats_url(), customer_id))
        inv = st.unkey_json("bill")
        assert inv["customer_id"] == customer_id
        assert {s.vm_id for s in samples} == {vm_id}
        terms = (Fraction(inv["discount_pct"]), Fraction(inv["credit_balance"]))
        want = _reference_view(samples, customer_id, inv["month"], terms)
        got = _bill_view(inv)
        last.update(want=want, got=got, batches=batches)
        # two batches or more: the bill follows the stream, not only its first batch
        return (inv, batches, want) if got == want and batches >= 2 else None

    try:
        inv, batches, want = _poll("the bill to equal the reference", agreeing_bill, 120, 2.0)
    except pytest.fail.Exception:
        pytest.fail(f"bill never matched the reference; last: {last}")
    assert batches >= 2
    assert Decimal(inv["total"]) > 0, inv
    assert want["lines"]["vcpu"][0] > 0 and want["lines"]["memory"][0] > 0
    assert want["lines"]["network"][1] >= Decimal("0.01")

    # `unkey logs`: every build line of the event stream, then the VM's console
    listed = [json.loads(line) for line in
              st.unkey("deployments", "events", dep["id"], "--json").splitlines()]  # fmt: skip
    build_lines = [e["message"] for e in listed if e["phase"] == "build"]
    assert any(m.startswith("asset ready") for m in build_lines), build_lines
    # live progress: each layer's bytes and the rootfs steps, each item's last record at 100 %
    last = {p["item"]: p for e in listed if (p := e["data"].get("progress"))}
    assert any(i.startswith("layer ") for i in last) and "rootfs" in last, build_lines
    assert all(p["done"] == p["total"] for p in last.values()), last
    logs = st.unkey("logs", dep["id"])
    build_part, sep, console_part = logs.partition(f"==> console of VM {vm_id}")
    assert sep, logs
    assert build_part.startswith(f"==> build log of deployment {dep['id']}")
    for e in listed:  # every build step; layer progress summarised (first and last at least)
        if e["phase"] == "build" and not e["data"].get("progress"):
            assert e["message"] in build_part, f"build line {e['message']!r} missing from logs"
    for p in last.values():  # each item's final record, as BuildProgress renders it
        final = BuildProgress.from_dict(p).render()
        assert final in build_part, (final, build_part)
    # the sandbox's console is the output of the project's guest init; under qemu it is the
    # guest kernel's boot lines (uptime stamps) and the project's initramfs switching root
    marker = "vminit" if driver == "sandbox" else "UNKEY_INITRAMFS"
    assert marker in console_part, f"no {marker} output in the console: {logs[-2000:]}"
    if driver == "qemu":
        assert re.search(r"^\[\s*\d+\.\d+\] ", console_part, re.M), console_part[-2000:]
    # --follow keeps polling the console (a few polls), and Ctrl-C ends it cleanly
    follow = subprocess.Popen(
        [*UNKEY, "logs", dep["id"], "--follow", "--no-build", "--interval", "0.3"],
        cwd=REPO,
        env={**st.env, "UNKEY_API_KEY": st.api_key or ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a runner started in the background of a script has SIGINT ignored, and children
        # inherit that: give the CLI the default a person at a terminal has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )
    lines: list[str] = []
    header = threading.Event()

    def read_out() -> None:
        assert follow.stdout is not None
        for line in follow.stdout:
            lines.append(line)
            if line.startswith("==> console of VM"):
                header.set()

    reader = threading.Thread(target=read_out, daemon=True)
    reader.start()
    try:
        # its first console header says it is past its start-up (seconds of imports on a loaded
        # machine: a Ctrl-C in them is a KeyboardInterrupt traceback); then a few polls
        assert header.wait(60), f"`unkey logs --follow` printed no console in 60 s: {lines}"
        time.sleep(1.5)
        assert follow.poll() is None, "`unkey logs --follow` ended while the VM runs"
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=30)
        reader.join(timeout=30)
        assert follow.stderr is not None
        out, errs = "".join(lines), follow.stderr.read()
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    assert follow.returncode == 0, errs
    assert f"==> console of VM {vm_id}" in out and marker in out, out[-2000:]
    # another customer cannot read them (404, exit code 4)
    other = st.unkey_json("customers", "create", f"e2e-other-{uuid.uuid4().hex[:8]}")
    denied = st.unkey_fails("logs", dep["id"], api_key=other["secret"])
    assert denied.returncode == 4, denied.stderr
    assert "not found" in denied.stderr
    return ref


@pytest.mark.timeout(300)
def test_journey_sandbox(stack_factory: Callable[[str], Stack], tmp_path: Path) -> None:
    st = stack_factory("sandbox")
    ref = _journey(st, tmp_path, driver="sandbox", deploy_timeout_s=180)
    # two more VMs (the same image: its asset is built already), then the purge
    more = tmp_path / "more.yaml"
    more.write_text(f"name: e2e-more\nimage: {ref}\nresources: {{cpu: 1, memory: 64MiB}}\n"
                    "port: 8080\nreplicas: 2\n")  # fmt: skip
    dep = st.unkey_json("deploy", str(more), "--wait", timeout_s=180)
    assert dep["state"] == "running", dep
    _purge_leaves_nothing(st, driver="sandbox", vms=3)


@pytest.mark.qemu
@pytest.mark.timeout(300)
def test_journey_qemu(stack_factory: Callable[[str], Stack], tmp_path: Path) -> None:
    st = stack_factory("qemu")
    _journey(st, tmp_path, driver="qemu", deploy_timeout_s=240)
    _purge_leaves_nothing(st, driver="qemu", vms=1)
