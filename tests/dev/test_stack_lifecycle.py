"""The local stack's lifecycle (dev/stack.Stack) with small real processes as its services.

`unkey dev down --purge-vms` waits for a service's purge as long as its ``purge_timeout_s`` says
(metald's: as long as the VMs recorded need), not its ordinary stop timeout; a purge cut short
by SIGKILL is an error naming it, never a silent success. `unkey dev up` names a service that
exited after it became healthy. A real metald purging real sandbox VMs is
tests/e2e/test_journey.py (nothing of them left after `dev down --purge-vms`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from unkey_deploy.core import config as core_config
from unkey_deploy.core.config import MetaldConfig
from unkey_deploy.core.errors import Unavailable
from unkey_deploy.dev.stack import ServiceSpec, Stack
from unkey_deploy.metald.service import CreateVm, Metald
from unkey_deploy.store import db
from unkey_deploy.testing.rootfs import build_test_rootfs
from unkey_deploy.testing.subnets import reserved_subnet

# SIGUSR1: "purge" for argv[2] seconds, then say so and exit; SIGTERM: exit at once
SERVICE = """
import os, signal, sys, time
from pathlib import Path
d, purge_s = Path(sys.argv[1]), float(sys.argv[2])
def purge(*_):
    time.sleep(purge_s)
    (d / "purged").write_text("done")
    os._exit(0)
signal.signal(signal.SIGUSR1, purge)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
(d / "ready").write_text("")
while True:
    time.sleep(1)
"""


def _stack(tmp_path: Path, *, purge_s: float, budget_s: float) -> Stack:
    data = tmp_path / "stack"
    settings = core_config.load(environ={"UNKEY_DATA_DIR": str(data)})
    spec = ServiceSpec(
        "metald",
        # the data dir on the command line: dev/stack.py trusts only such pids (_is_ours)
        lambda _s: [sys.executable, "-c", SERVICE, str(data), str(purge_s)],
        lambda _s: (data / "ready").exists(),
        stop_timeout_s=0.5,
        purge_timeout_s=lambda _s: budget_s,
    )
    stack = Stack(settings, [spec])
    stack.up(timeout_s=30)
    return stack


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def test_down_waits_for_a_purge_longer_than_the_stop_timeout(tmp_path: Path) -> None:
    stack = _stack(tmp_path, purge_s=2.0, budget_s=30)
    pid = stack.pid("metald")
    assert pid is not None
    t0 = time.monotonic()
    assert stack.down(purge_vms=True) == ["metald"]
    assert (stack.data_dir / "purged").read_text() == "done"  # finished, not killed at 0.5 s
    assert time.monotonic() - t0 >= 2.0
    assert _gone(pid) and stack.pid("metald") is None


def test_down_without_purge_stops_with_sigterm(tmp_path: Path) -> None:
    stack = _stack(tmp_path, purge_s=2.0, budget_s=30)
    assert stack.down() == ["metald"]
    assert not (stack.data_dir / "purged").exists()


def test_a_purge_cut_short_is_an_error_naming_it(tmp_path: Path) -> None:
    stack = _stack(tmp_path, purge_s=60.0, budget_s=1.0)
    pid = stack.pid("metald")
    with pytest.raises(Unavailable) as exc:
        stack.down(purge_vms=True)
    msg = exc.value.message
    assert msg.startswith(f"the purge did not finish and was killed: metald (pid {pid}) after 1 s")
    assert msg.endswith("stopped: metald")
    assert "dev down --purge-vms" in (exc.value.suggestion or "")
    deadline = time.monotonic() + 10
    while pid is not None and not _gone(pid):
        assert time.monotonic() < deadline, "the killed service is still running"
        time.sleep(0.05)
    assert not (stack.data_dir / "purged").exists()
    assert not (stack.data_dir / "run" / "metald.pid").exists()


def test_up_names_a_service_that_exited_after_it_became_healthy(tmp_path: Path) -> None:
    """Like a metald that starts, then fails recovering a VM: `dev up` must not say all is up."""
    data = tmp_path / "stack"
    settings = core_config.load(environ={"UNKEY_DATA_DIR": str(data)})
    # healthy at once, gone a moment later (while the next service is still starting)
    brief = [sys.executable, "-c", "import sys, time; from pathlib import Path; "
             "Path(sys.argv[1], 'brief-ready').write_text(''); time.sleep(0.3); sys.exit(3)",
             str(data)]  # fmt: skip
    slow = [sys.executable, "-c", "import sys, time; from pathlib import Path; time.sleep(1.5); "
            "Path(sys.argv[1], 'slow-ready').write_text(''); time.sleep(60)",
            str(data)]  # fmt: skip
    stack = Stack(settings, [
        ServiceSpec("metald", lambda _s: brief, lambda _s: (data / "brief-ready").exists()),
        ServiceSpec("deployer", lambda _s: slow, lambda _s: (data / "slow-ready").exists()),
    ])  # fmt: skip
    try:
        with pytest.raises(Unavailable) as exc:
            stack.up(timeout_s=30)
        assert exc.value.message == "metald exited after starting"
        assert str(stack.data_dir / "logs" / "metald.log") in (exc.value.suggestion or "")
    finally:
        stack.down()
    assert stack.pid("deployer") is None


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a real metald records the VM)")
def test_a_purge_without_metald_running_says_the_vms_were_not_purged(tmp_path: Path) -> None:
    stack = _stack(tmp_path, purge_s=0.0, budget_s=30)
    stack.down()  # metald is not running any more
    engine = db.make_engine(stack.settings.resolved_database_url)
    db.upgrade(engine)
    with reserved_subnet() as subnet:
        md = Metald(MetaldConfig(driver="sandbox", subnet=subnet, host_name="purge-test"), engine,
                    tmp_path / "metald")  # fmt: skip
        try:
            md.create_vm(CreateVm("dep_p", "cust_p", build_test_rootfs(tmp_path / "r.ext4")))
            with pytest.raises(Unavailable) as exc:
                stack.down(purge_vms=True)
            assert exc.value.message.startswith(
                "metald was not running, so the 1 VM(s) the stack records were not purged"
            )
            assert "unkey dev up" in (exc.value.suggestion or "")
        finally:
            md.shutdown()
            engine.dispose()
    assert stack.down(purge_vms=True) == []  # nothing recorded, nothing running: fine
