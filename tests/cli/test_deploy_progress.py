"""`unkey deploy --wait` shows build progress: live bars on a terminal, plain lines without one,
and ends with the app's URL on stdout. The events come from a real gatewayd's SSE stream; the
test writes them where the deploy workflow does (the control plane's deployment records)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import threading
from pathlib import Path

from unkey_deploy.cli.output import EventRenderer
from unkey_deploy.store import controlplane as cp
from unkey_deploy.testing.deploys import DeployDriver
from unkey_deploy.testing.gateway import UNKEY, RunningGateway, new_customer
from unkey_deploy.testing.gateway import TestCustomer as Customer
from unkey_deploy.testing.gateway import run_unkey as unkey

URL = "http://10.1.0.2:8080"
LAYER_1 = "layer 1/2 sha256:0123456789ab"
LAYER_2 = "layer 2/2 sha256:ba9876543210"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _app(tmp_path: Path, name: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        f"name: {name}\nimage: ghcr.io/acme/{name}:1.0\nresources:\n  cpu: 1\n"
        "  memory: 512MiB\nport: 8080\n"
    )
    return p


def _progress(item: str, done: int, total: int, unit: str = "bytes", detail: str = "") -> dict:
    p = {"item": item, "done": done, "total": total, "unit": unit}
    if detail:
        p["detail"] = detail
    return p


def _drive(records: cp.DeploymentRecords, dep_id: str) -> None:
    """What a deploy writes: build lines, layer bytes (4 MB in 20 steps, 1 MB in 2), the rootfs
    steps, scheduling, boot, health check, running."""
    records.set_state(dep_id, "building")
    records.event(dep_id, "build", "resolve: ghcr.io/acme/app:1.0")
    for i in range(21):
        done = i * 200_000
        records.event(dep_id, "build", f"{LAYER_1}: {done}", progress=_progress(LAYER_1, done,
                      4_000_000))  # fmt: skip
    for done in (0, 1_000_000):
        records.event(dep_id, "build", f"{LAYER_2}: {done}", progress=_progress(LAYER_2, done,
                      1_000_000))  # fmt: skip
    for step, detail in enumerate(("hardening", "mkfs.ext4 + e2fsck", "zstd", "done")):
        records.event(dep_id, "build", f"rootfs step {step}",
                      progress=_progress("rootfs", step, 3, "steps", detail))  # fmt: skip
    records.event(dep_id, "asset", "asset ready", asset_id="ast_x")
    records.set_state(dep_id, "deploying", asset_id="ast_x")
    records.event(dep_id, "vm", "scheduled vm_1 on host h1", vm_id="vm_1")
    records.event(dep_id, "vm", "booting vm_1 (sandbox)", vm_id="vm_1")
    records.event(dep_id, "vm", f"vm_1 is running at {URL}", vm_id="vm_1", url=URL)
    records.set_state(dep_id, "running", url=URL)
    records.event(dep_id, "done", f"deployment running at {URL}", url=URL)


def _deploy(
    gateway: RunningGateway, drive_deploy: DeployDriver, c: Customer, app: Path, *, tty: bool
) -> tuple[int, str, str, str]:
    """`unkey deploy APP --wait` with stderr on a pseudo-terminal (``tty``) or a pipe; returns
    (exit code, stdout, stderr, deployment id)."""
    master = slave = -1
    if tty:
        master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(UNKEY), "deploy", str(app), "--wait"],
        env=gateway.cli_env(c.key, TERM="xterm-256color"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave if tty else subprocess.PIPE,
    )
    chunks: list[bytes] = []
    reader = None
    if tty:
        os.close(slave)

        def read() -> None:
            while True:
                try:
                    b = os.read(master, 65536)
                except OSError:  # EIO: the CLI closed the terminal's last writer
                    return
                if not b:
                    return
                chunks.append(b)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
    try:
        # a pause before driving lets the CLI attach to the stream: the bars then animate
        dep_id, out, err = drive_deploy(proc, c, _drive, settle_s=0.3)
    finally:
        if reader is not None:
            reader.join(10)
            os.close(master)
    stderr = b"".join(chunks).decode() if tty else err.decode()
    return proc.returncode, out.decode(), stderr, dep_id


def test_deploy_wait_on_a_terminal_draws_progress_bars_and_ends_with_the_url(
    gateway: RunningGateway, drive_deploy: DeployDriver, tmp_path: Path
) -> None:
    c = new_customer(gateway)
    code, out, err, _ = _deploy(gateway, drive_deploy, c, _app(tmp_path, "bars"), tty=True)
    assert code == 0, err
    assert out == f"{URL}\n"
    assert ANSI.search(err), "a terminal gets a live display"
    assert "━" in err, "a bar is drawn"
    text = ANSI.sub("", err)
    # the final state of each bar: the item, 100 %, the full amount
    assert re.search(rf"{re.escape(LAYER_1)}\s.*━.*100%\s+4\.0/4\.0 MB", text), text
    assert re.search(rf"{re.escape(LAYER_2)}\s.*━.*100%\s+1\.0/1\.0 MB", text), text
    assert re.search(r"rootfs\s.*━.*100%\s+3/3 done", text), text
    # the other steps as lines
    for line in ("resolve: ghcr.io/acme/app:1.0", "scheduled vm_1 on host h1",
                 "booting vm_1 (sandbox)", f"vm_1 is running at {URL}"):  # fmt: skip
        assert line in text
    # progress is drawn as bars, never as one line per event
    assert f"{LAYER_1}: 2000000" not in text


def test_deploy_wait_without_a_terminal_prints_plain_throttled_lines(
    gateway: RunningGateway, drive_deploy: DeployDriver, tmp_path: Path
) -> None:
    c = new_customer(gateway)
    code, out, err, _ = _deploy(gateway, drive_deploy, c, _app(tmp_path, "plain"), tty=False)
    assert code == 0, err
    assert out == f"{URL}\n"
    assert "\x1b" not in err, "no escape codes in CI logs"
    layer_1 = [line for line in err.splitlines() if LAYER_1 in line]
    # 21 records within a second of each other: the first and the final one only
    assert len(layer_1) == 2, err
    assert layer_1[0].endswith(f"{LAYER_1}: 0.0/4.0 MB (0%)")
    assert layer_1[1].endswith(f"{LAYER_1}: 4.0/4.0 MB (100%)")
    assert any(line.endswith(f"{LAYER_2}: 1.0/1.0 MB (100%)") for line in err.splitlines())
    rootfs = [line.split("build  ", 1)[1] for line in err.splitlines() if "rootfs:" in line]
    assert rootfs == [  # every step: there are few, and each is news
        "rootfs: step 0/3 (0%) hardening",
        "rootfs: step 1/3 (33%) mkfs.ext4 + e2fsck",
        "rootfs: step 2/3 (66%) zstd",
        "rootfs: step 3/3 (100%) done",
    ]
    for line in ("scheduled vm_1 on host h1", "booting vm_1 (sandbox)", f"running at {URL}"):
        assert line in err


def test_deployments_events_summarises_progress_and_json_keeps_every_event(
    gateway: RunningGateway, drive_deploy: DeployDriver, tmp_path: Path
) -> None:
    c = new_customer(gateway)
    code, _out, err, dep_id = _deploy(gateway, drive_deploy, c, _app(tmp_path, "events"), tty=False)
    assert code == 0, err

    r = unkey(gateway, "deployments", "events", dep_id, api_key=c.key)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert [x for x in lines if LAYER_1 in x][-1].endswith("4.0/4.0 MB (100%)")
    assert len([x for x in lines if LAYER_1 in x]) == 2
    assert "\x1b" not in r.out

    r = unkey(gateway, "deployments", "events", dep_id, "--json", api_key=c.key)
    events = [json.loads(x) for x in r.out.splitlines()]
    layer_1 = [e["data"]["progress"] for e in events if "progress" in e["data"]
               and e["data"]["progress"]["item"] == LAYER_1]  # fmt: skip
    assert [p["done"] for p in layer_1] == [i * 200_000 for i in range(21)]


def test_renderer_shows_an_events_message_when_its_progress_is_malformed() -> None:
    buf = io.StringIO()
    with EventRenderer(buf) as view:
        assert not view.live  # not a terminal
        bad = {"item": "layer 1/1", "done": 5, "total": 3, "unit": "bytes"}
        view.event("build", {"at": "2026-01-01T10:00:00Z", "message": "odd [b]x[/b]",
                             "data": {"progress": bad}})  # fmt: skip
    assert buf.getvalue() == "10:00:00     build  odd [b]x[/b]\n"


def test_renderer_never_passes_control_characters_from_outside_text() -> None:
    """A layer entry named with an escape sequence must not drive the terminal or a CI log."""
    buf = io.StringIO()
    with EventRenderer(buf) as view:
        view.event("build", {"at": "2026-01-01T10:00:00Z",
                             "message": "skipped device \x1b[2J\x1b]0;pwned\x07 x\ty"})  # fmt: skip
    assert buf.getvalue() == "10:00:00     build  skipped device \\x1b[2J\\x1b]0;pwned\\x07 x\ty\n"
