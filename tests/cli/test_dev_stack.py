"""`unkey dev up|status|down`: a real local stack in a tmp dir; down then up loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from unkey_deploy.core.net import free_port

UNKEY = Path(sys.executable).parent / "unkey"
ROOT = Path(__file__).resolve().parents[2]


def _run(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_")}
    base.update(UNKEY_CONFIG_HOME=str(cwd / "cfg"), **env)
    return subprocess.run(
        [str(UNKEY), *args], cwd=cwd, env=base, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def test_dev_up_status_down_keeps_state(tmp_path: Path) -> None:
    port = str(free_port())
    try:
        up = _run(tmp_path, "dev", "up", "--port", port)
        assert up.returncode == 0, up.stderr
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

        assert _run(tmp_path, "dev", "up", "--port", port).returncode == 0
        ls = _run(tmp_path, "deployments", "ls", "--json", UNKEY_API_KEY=key)
        assert ls.returncode == 0, ls.stderr
        assert [d["id"] for d in json.loads(ls.stdout)] == [dep_id]
    finally:
        _run(tmp_path, "dev", "down")
        pid_file = tmp_path / ".unkey" / "run" / "gatewayd.pid"
        if pid_file.exists():  # dev down failed: do not leave a server behind
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
