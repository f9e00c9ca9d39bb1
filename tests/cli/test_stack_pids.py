"""Which pids the local stack treats as its own (guards against recycled pids)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from unkey_deploy.dev.stack import _is_ours


def test_helpers_naming_the_data_dir_are_ours_strangers_are_not(tmp_path: Path) -> None:
    data = tmp_path / "stack-data"  # no "unkey" in the path, like a user's own directory
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    helper = subprocess.Popen([*sleeper, "-sd", str(data / "nats")])  # like nats-server
    stranger = subprocess.Popen([*sleeper, str(tmp_path / "elsewhere")])
    try:
        for p in (helper, stranger):  # until each has exec'd (before, /proc shows our cmdline)
            deadline = time.monotonic() + 30
            while b"time.sleep" not in Path(f"/proc/{p.pid}/cmdline").read_bytes():
                assert time.monotonic() < deadline, "the sleeper never started"
                time.sleep(0.01)
        assert _is_ours(helper.pid, data)
        assert not _is_ours(stranger.pid, data)
    finally:
        for p in (helper, stranger):
            p.kill()
            p.wait()
