"""Stopping and purging sandbox VMs, against the same signals sent by hand in the same run.

    sudo .venv/bin/python bench/stop.py [--vms 20] [--stop-timeout 2] [--runs 2]

``--vms`` sandbox VMs of the test image are booted, whose app ignores SIGTERM (busybox httpd as
the sandbox's pid 1 has no handler for it): each stop waits the whole grace period
(``metald.stop_timeout_s``), then kills. That is the worst case of a graceful stop.

* ``purge``: ``Metald.shutdown()`` (what ``unkey dev down --purge-vms`` runs): every VM
  stopped and deleted (processes, cgroup, netns + veth, overlay, jail, lease, row), then the
  host's network rules removed.
* baseline ``bare``: the same number of bare ``bwrap`` sandboxes of the same tree, each its own
  process, sent SIGTERM all at once, given the same grace period, then SIGKILLed and reaped
  (nothing else to clean up). What any purge must wait for at least.
* ``stop-one``: ``Metald.stop`` of one VM (the grace period, the kill and freeing the VM's
  resources) against one bare sandbox's TERM, grace period, KILL.

Last lines: ``RESULT case=... seconds=... baseline=... overhead_ms=...``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from boot import bare_bwrap_argv, bare_tree, ours, wait_http  # noqa: E402

from unkey_deploy.core.config import MetaldConfig  # noqa: E402
from unkey_deploy.core.net import free_port  # noqa: E402
from unkey_deploy.core.procs import children  # noqa: E402
from unkey_deploy.metald.kernel import prepare_kernel  # noqa: E402
from unkey_deploy.metald.service import Metald  # noqa: E402
from unkey_deploy.store.db import make_engine, upgrade  # noqa: E402
from unkey_deploy.testing.rootfs import build_test_rootfs  # noqa: E402


def bare(tmp: Path, n: int, grace: float) -> float:
    """``n`` bare bwrap sandboxes (each its own tree and port), TERM, grace, KILL: seconds."""
    procs = []
    for i in range(n):
        port = free_port()
        argv = bare_bwrap_argv(bare_tree(tmp / f"bare{i}", port))
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{port}/", 10)
    t0 = time.perf_counter()
    for p in procs:  # TERM to each sandbox's pid 1 (bwrap forwards nothing: as metald does)
        for child in children(p.pid):
            os.kill(child, signal.SIGTERM)
    deadline = t0 + grace
    while any(p.poll() is None for p in procs) and time.perf_counter() < deadline:
        time.sleep(0.01)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--stop-timeout", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--subnet", default="172.31.20.0/24")
    ap.add_argument(
        "--native-dir", default=os.environ.get("UNKEY_NATIVE_DIR", str(REPO / ".native"))
    )
    args = ap.parse_args()
    kernel = prepare_kernel(Path(args.native_dir))
    purge, purge_bare, one, one_bare = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="unkey-bench-stop-") as tmpd:
        tmp = Path(tmpd)
        os.chmod(tmp, 0o755)  # noqa: S103 - the unprivileged bwrap reaches the trees inside
        image = build_test_rootfs(tmp / "app.ext4", port=8080)
        cfg = MetaldConfig(driver="sandbox", host_name="bench-stop", subnet=args.subnet,
                           cpus=256, memory_mib=65536,
                           stop_timeout_s=args.stop_timeout)  # fmt: skip
        for run in range(args.runs):
            engine = make_engine(f"sqlite:///{tmp / f'stop{run}.db'}")
            upgrade(engine)
            md = Metald(cfg, engine, tmp / f"stop{run}", kernel=kernel)
            try:
                _, vm_id = ours(md, image, 20)
                t0 = time.perf_counter()
                md.stop(vm_id)
                one.append(time.perf_counter() - t0)
                for _ in range(args.vms):
                    ours(md, image, 20)
                t0 = time.perf_counter()
                md.shutdown()
                purge.append(time.perf_counter() - t0)
            except BaseException:
                md.shutdown()
                raise
            finally:
                engine.dispose()
            base_dir = tmp / f"bare-run{run}"
            base_dir.mkdir()
            os.chmod(base_dir, 0o755)  # noqa: S103
            (base_dir / "one").mkdir()
            one_bare.append(bare(base_dir / "one", 1, args.stop_timeout))
            purge_bare.append(bare(base_dir, args.vms, args.stop_timeout))
    lines = []
    for case, mine, base in (("stop-one", one, one_bare), ("purge", purge, purge_bare)):
        m, b = statistics.median(mine), statistics.median(base)
        print(f"{case}: ours {[round(x, 2) for x in mine]} s, bare {[round(x, 2) for x in base]} s",
              file=sys.stderr)  # fmt: skip
        n = 1 if case == "stop-one" else args.vms
        lines.append(f"RESULT case={case} vms={n} stop_timeout_s={args.stop_timeout} "
                     f"seconds={m:.3f} baseline={b:.3f} "
                     f"overhead_ms={(m - b) * 1000:.0f}")  # fmt: skip
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
