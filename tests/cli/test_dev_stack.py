"""`unkey dev up|status|down`: a real local stack in a tmp dir; down then up loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from unkey_deploy.core.net import free_port

UNKEY = Path(sys.executable).parent / "unkey"
ROOT = Path(__file__).resolve().parents[2]


def _run(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_")}
    base.update(UNKEY_CONFIG_HOME=str(cwd / "cfg"), **env)
    return subprocess.run(
        [str(UNKEY), *args], cwd=cwd, env=base, capture_output=True, text=True, timeout=240,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def _logs(data: Path) -> str:
    return "".join(f"\n--- {f.name}:\n{f.read_text(errors='replace')[-1500:]}"
                   for f in sorted((data / "logs").glob("*.log")))  # fmt: skip


def test_dev_up_status_down_keeps_state(tmp_path: Path) -> None:
    port = str(free_port())
    try:
        up = _run(tmp_path, "dev", "up", "--port", port, "--timeout", "90")
        assert up.returncode == 0, up.stderr + _logs(tmp_path / ".unkey")
        assert up.stdout.strip() == f"https://127.0.0.1:{port}"
        data = tmp_path / ".unkey"
        assert (data / "tls" / "gateway.crt").exists()
        assert oct((data / "admin-token").stat().st_mode & 0o777) == "0o600"
        st = _run(tmp_path, "dev", "status", "--json")
        assert st.returncode == 0, st.stderr
        (gw,) = [s for s in json.loads(st.stdout) if s["name"] == "gatewayd"]
        assert gw["running"] and gw["healthy"]

        # The CLI finds the local stack (URL, certificate, admin token) by itself.
        cust = _run(tmp_path, "customers", "create", "devco", "--json")
        assert cust.returncode == 0, cust.stderr
        key = json.loads(cust.stdout)["secret"]
        dep = _run(tmp_path, "deploy", str(ROOT / "examples" / "app.yaml"), UNKEY_API_KEY=key)
        assert dep.returncode == 0, dep.stderr
        dep_id = dep.stdout.strip()

        down = _run(tmp_path, "dev", "down")
        assert down.returncode == 0 and "gatewayd" in down.stderr
        assert not (data / "run" / "gatewayd.pid").exists()
        st = _run(tmp_path, "dev", "status")
        assert st.returncode == 7  # not running
        assert "Finished server process" in (data / "logs" / "gatewayd.log").read_text()

        again = _run(tmp_path, "dev", "up", "--port", port, "--timeout", "90")
        assert again.returncode == 0, again.stderr + _logs(data)
        ls = _run(tmp_path, "deployments", "ls", "--json", UNKEY_API_KEY=key)
        assert ls.returncode == 0, ls.stderr
        assert [d["id"] for d in json.loads(ls.stdout)] == [dep_id]
    finally:
        _run(tmp_path, "dev", "down", "--purge-vms")  # the deployment's VM and host rules too
        pid_file = tmp_path / ".unkey" / "run" / "gatewayd.pid"
        if pid_file.exists():  # dev down failed: do not leave a server behind
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_service_that_never_becomes_healthy_is_stopped_and_its_port_drawn_again(
    tmp_path: Path,
) -> None:
    from unkey_deploy.core import config as core_config
    from unkey_deploy.core.errors import Unavailable
    from unkey_deploy.dev.stack import ServiceSpec, Stack, _metrics_health

    settings = core_config.load(environ={"UNKEY_DATA_DIR": str(tmp_path / "stack")})
    # runs, but is not one of ours (no unkey_deploy in its command line) and serves nothing:
    # the real health check of a worker service says so
    hung = ServiceSpec("deployer", lambda _s: ["sleep", "600"], _metrics_health("deployer"))
    stack = Stack(settings, [hung])
    with pytest.raises(Unavailable) as exc:
        stack.up(timeout_s=1)
    msg = exc.value.message
    pid_file = stack.data_dir / "run" / "deployer.pid"
    assert msg.startswith("deployer did not become healthy within 1 s (last check: pid ")
    assert f" of {pid_file} is another program (reused pid): 'sleep 600 ')" in msg
    port_file = stack.data_dir / "metrics" / "deployer.port"
    assert not port_file.exists()  # the next `dev up` draws a new port
    assert stack.pid("deployer") is None
    marker = f"UNKEY_DATA_DIR={stack.data_dir}".encode()
    still_running = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                still_running.append(proc.name)
        except OSError:
            continue  # gone meanwhile, or not ours to read
    assert not still_running, "the hung service is still running"


def test_worker_health_check_knows_its_process_by_pid_whatever_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The health check of a worker service reads the pid its /metrics reports; the exposition
    writes a pid of 1,000,000 or more as 1.234567e+06 (pid_max is 4194304 on many hosts)."""
    from unkey_deploy.core import config as core_config
    from unkey_deploy.core import metrics
    from unkey_deploy.dev.stack import Stack, _last_problem, _metrics_health

    port = free_port()
    settings = core_config.load(
        environ={"UNKEY_DATA_DIR": str(tmp_path / "stack"), "UNKEY_METRICS__DEPLOYER": str(port)}
    )
    metrics.serve(port, metrics.DEPLOYER)
    try:
        check = _metrics_health("deployer")
        for big in (1_234_567, 4_194_303):
            metrics._PID.set(big)
            monkeypatch.setattr(Stack, "pid_or_why", lambda _s, _n, forget=True, big=big: (big, ""))
            assert check(settings)
        monkeypatch.setattr(Stack, "pid_or_why", lambda _s, _n, forget=True: (777, ""))  # not it
        assert not check(settings)
        assert "answered for pid 4.194303e+06, not pid 777" in _last_problem(settings, "deployer")
    finally:
        metrics._PID.set(os.getpid())
        metrics.shutdown()
