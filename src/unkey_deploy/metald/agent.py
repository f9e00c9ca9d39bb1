"""``python -m unkey_deploy.metald.agent``: one metald host process (registers, reconciles).

Used to run several metald hosts (e.g. one per network namespace) against one database.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from ..core.config import MetaldConfig
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
    args = ap.parse_args(argv)
    cfg = MetaldConfig(
        driver=args.driver,
        host_name=args.host_name,
        subnet=args.subnet,
        kernel_dir=args.kernel_dir,
        cpus=args.cpus,
        memory_mib=args.memory_mib,
        stop_timeout_s=1.0,
    )
    engine = make_engine(args.database_url)
    kernel = find_kernel(args.kernel_dir) if args.kernel_dir else None
    md = Metald(cfg, engine, args.state_dir, kernel=kernel)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    md.start(interval=args.interval)
    print(f"READY {md.host_id}", flush=True)
    done.wait()
    md.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
