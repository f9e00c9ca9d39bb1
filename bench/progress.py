"""What live build progress and private cache hits cost, against the same work without them.

    sudo .venv/bin/python bench/progress.py [--mb 64] [--runs 3]

An image (busybox + one ``--mb`` MB incompressible layer, zstd) is pushed to a Debian
``docker-registry`` started on 127.0.0.1 for the run. Then, alternating (the machine is shared):

* ``plain``: ``build_rootfs`` from the registry with no progress callback;
* ``progress``: the same with builderd's callback: :class:`ProgressThrottle` writing each record
  to ``build_logs`` (SQLite) as a worker does. Reported: the median time of each, the overhead
  (noisy on a shared machine: the two differ only by the callback), the time spent inside the
  callback itself (the real cost), the callbacks the pipeline made and the records written.

And the build cache through builderd (``submit`` -> ``wait``): a hit on the customer's own asset
vs a hit on another customer's (which registers an asset record of the requester's own over the
same blob: one sha256 of the compressed rootfs).
Last line: ``RESULT plain_seconds=... progress_seconds=... overhead_pct=... callback_ms=...
callbacks=... records=... own_hit_seconds=... cross_hit_seconds=...``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.builder.api import BuildOptions, BuildProgress, BuildRequest, BuildState
from unkey_deploy.builder.service import (
    BuildService,
    OciImageSource,
    ProgressThrottle,
    build_rootfs,
)
from unkey_deploy.builder.vminit import build_init
from unkey_deploy.core.config import BuilderConfig
from unkey_deploy.core.ids import new_build_id, new_customer_id
from unkey_deploy.store.db import make_engine, session_factory, upgrade
from unkey_deploy.testing import images as im
from unkey_deploy.testing.registry import start_registry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-progress-"))
    reg = start_registry(work / "registry")
    try:
        base = im.Layer.of(im.busybox_entries(), "zstd")
        blob = os.urandom(a.mb << 20)
        big = im.Layer.of([im.E("data/", "dir"), im.E("data/random.bin", data=blob)], "zstd")
        im.push(reg.host, "bench/progress", "v1",
                im.image([base, big], entrypoint=["/bin/busybox", "sleep", "1"]))  # fmt: skip
        ref = reg.ref("bench/progress", "v1")
        url = f"sqlite:///{work / 'control.db'}"
        upgrade(make_engine(url))
        factory = session_factory(make_engine(url))
        assets = AssetManager(factory, FsBlobStore(work / "blobs"), work / "cache")
        init = build_init(work / "native")
        svc = BuildService(factory, assets, OciImageSource(), work_dir=work / "work",
                           init_binary=init, poll_s=0.05)  # fmt: skip
        source, cfg = OciImageSource(), BuilderConfig()
        plain_runs: list[float] = []
        progress_runs: list[float] = []
        callbacks = records = 0
        spent = [0.0]  # seconds inside the progress callback (throttle + database writes)
        for i in range(a.runs):
            for with_progress in (False, True) if i % 2 == 0 else (True, False):  # both orders
                calls = [0]
                bid = new_build_id()

                def record(p: BuildProgress, b: str = bid) -> None:
                    svc.log_line(b, p.render(), p)

                throttle = ProgressThrottle(record)

                def count(p: BuildProgress, c: list[int] = calls, t: ProgressThrottle = throttle
                          ) -> None:  # fmt: skip
                    c[0] += 1
                    t0 = time.perf_counter()
                    t(p)
                    spent[0] += time.perf_counter() - t0

                t0 = time.monotonic()
                build_rootfs(source, ref, BuildOptions(), work / f"w{i}{with_progress}",
                             init_binary=init, config=cfg, log=lambda _line: None,
                             progress=count if with_progress else None)  # fmt: skip
                dt = time.monotonic() - t0
                shutil.rmtree(work / f"w{i}{with_progress}", ignore_errors=True)
                (progress_runs if with_progress else plain_runs).append(dt)
                if with_progress:
                    callbacks = calls[0]
                    records = _progress_rows(svc, bid)
                print(f"run {i + 1}: {'progress' if with_progress else 'plain   '} {dt:.2f} s",
                      flush=True)  # fmt: skip
        plain_s, prog_s = statistics.median(plain_runs), statistics.median(progress_runs)
        in_callback = spent[0] / len(progress_runs)
        print(f"progress: {callbacks} callbacks -> {records} records in build_logs; "
              f"{in_callback * 1000:.1f} ms per build inside the callback", flush=True)  # fmt: skip

        svc.start(1)
        alice, bob = new_customer_id(), new_customer_id()

        def timed(customer: str) -> tuple[float, bool]:
            t0 = time.monotonic()
            b = svc.wait(svc.submit(BuildRequest(ref, customer)), 600)  # type: ignore[arg-type]
            assert b.state == BuildState.SUCCEEDED, b.error
            return time.monotonic() - t0, b.cached

        timed(alice)  # builds
        own = [timed(alice) for _ in range(a.runs)]
        cross = [timed(new_customer_id()) for _ in range(a.runs)]
        timed(bob)
        svc.stop()
        if not all(c for _, c in own + cross):
            raise SystemExit("a repeated build was not a cache hit")
        own_s = statistics.median(t for t, _ in own)
        cross_s = statistics.median(t for t, _ in cross)
        print(f"cache hit: own asset {own_s:.3f} s, another customer's {cross_s:.3f} s "
              f"(own record registered over the same blob)", flush=True)  # fmt: skip
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    overhead = 100 * (prog_s - plain_s) / plain_s
    print(f"RESULT plain_seconds={plain_s:.2f} progress_seconds={prog_s:.2f} "
          f"overhead_pct={overhead:.1f} callback_ms={in_callback * 1000:.1f} "
          f"callbacks={callbacks} records={records} "
          f"own_hit_seconds={own_s:.3f} cross_hit_seconds={cross_s:.3f}")  # fmt: skip
    return 0


def _progress_rows(svc: BuildService, build_id: str) -> int:
    from sqlalchemy import func, select

    from unkey_deploy.builder.service import BuildLogRow

    with svc.factory() as s:
        n = s.scalar(
            select(func.count())
            .select_from(BuildLogRow)
            .where(BuildLogRow.build_id == build_id, BuildLogRow.progress.is_not(None))
        )
    return int(n or 0)


if __name__ == "__main__":
    raise SystemExit(main())
