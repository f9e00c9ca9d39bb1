"""``python -m unkey_deploy.metald.agent``: one metald host process (registers, reconciles).

Used to run several metald hosts (e.g. one per network namespace) against one database.
``--meter-file`` runs the metering collector on this host's VMs at 10 Hz and appends one line
per sample (``unix_time vm_id instance_id cpu_ns``) instead of publishing batches to NATS.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

from ..core.config import MetaldConfig
from ..metering.collector import Collector
from ..store.db import make_engine
from .kernel import find_kernel
from .service import Metald


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="metald-agent")
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--host-name", required=True)
    ap.add_argument("--subnet", default="172.31.0.0/19")
    ap.add_argument("--driver", default="auto")
    ap.add_argument("--kernel-dir", type=Path)
    ap.add_argument("--cpus", type=int)
    ap.add_argument("--memory-mib", type=int)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--lost-after", type=float, default=30.0, help="host_lost_after_s")
    ap.add_argument("--meter-file", type=Path)
    ap.add_argument(
        "--guest-dns", help="comma-separated name servers for the guests (default: the host's)"
    )
    args = ap.parse_args(argv)
    cfg = MetaldConfig(
        driver=args.driver,
        host_name=args.host_name,
        subnet=args.subnet,
        kernel_dir=args.kernel_dir,
        cpus=args.cpus,
        memory_mib=args.memory_mib,
        stop_timeout_s=1.0,
        host_lost_after_s=args.lost_after,
        guest_dns=args.guest_dns,
    )
    engine = make_engine(args.database_url)
    kernel = find_kernel(args.kernel_dir) if args.kernel_dir else None
    md = Metald(cfg, engine, args.state_dir, kernel=kernel)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    md.start(interval=args.interval)
    meter = None
    if args.meter_file:
        meter = threading.Thread(target=_meter, args=(md, args.meter_file, done), daemon=True)
        meter.start()
    print(f"READY {md.host_id}", flush=True)
    done.wait()
    if meter is not None:
        meter.join(timeout=5)
    md.shutdown()
    return 0


def _meter(md: Metald, path: Path, done: threading.Event) -> None:
    collector = Collector()
    with open(path, "a", buffering=1) as out:
        tick = 0
        while not done.wait(0.1):
            if tick % 10 == 0:
                collector.set_targets(md.meter_targets())
            tick += 1
            keys, rows = collector.sample()
            now = time.time()
            for k, row in zip(keys, rows, strict=True):
                out.write(f"{now:.3f} {k.vm_id} {k.instance_id} {int(row[1])}\n")
    collector.close()


if __name__ == "__main__":
    raise SystemExit(main())
