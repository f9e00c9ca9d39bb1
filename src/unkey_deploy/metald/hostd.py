"""``python -m unkey_deploy.metald.hostd``: one metald host with its metering loop.

The host agent (:class:`~.service.Metald`) boots, watches and recovers this host's VMs; the
metering loop samples every running VM instance every 100 ms (``meter_targets``) and hands the
samples to billaged, which spools and publishes 60 s batches to JetStream.

SIGTERM stops metering (partial batches are spooled, every series stays open) and closes the
agent; VMs keep running and are recovered by the next start, whose metering continues their
series. SIGUSR1 (``unkey dev down --purge-vms``) deletes this host's VMs first, metering each
until it is gone (its series then ends), then stops; a VM the purge could not delete goes on
being metered by the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from ..assets.service import open_assets
from ..core import metrics
from ..core.config import load
from ..core.log import configure
from ..metering.service import build as build_metering
from ..store.db import make_engine, upgrade
from .kernel import find_kernel
from .service import Metald


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="metald-hostd")
    ap.add_argument("--no-metering", action="store_true", help="run the agent only")
    args = ap.parse_args(argv)
    settings = load(environ=os.environ)
    configure("metald", settings.log_level)
    metrics.serve(settings.metrics.metald, metrics.METALD, metrics.METERING)
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    native = settings.metald.kernel_dir or settings.native_dir
    kernel = find_kernel(native) if native.exists() else None
    # VMs launched from an asset hold a lease on it; deleting the VM (here) releases it
    md = Metald(settings.metald, engine, settings.data_dir / "metald", kernel=kernel,
                leases=open_assets(settings))  # fmt: skip
    md.recover()
    md.start()
    print(f"metald: host {md.host_id} driver {md.driver.name}", file=sys.stderr, flush=True)
    purge = False
    purged = False

    async def run() -> None:
        nonlocal purge
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        tasks: set[asyncio.Task[None]] = set()

        async def purge_then_stop() -> None:
            nonlocal purged
            try:
                # in a thread: the metering loop goes on sampling each VM until it is deleted
                await asyncio.to_thread(md.shutdown)
                purged = True
            finally:
                stop.set()

        def purge_and_stop() -> None:
            nonlocal purge
            if not purge:
                purge = True
                tasks.add(loop.create_task(purge_then_stop()))

        loop.add_signal_handler(signal.SIGUSR1, purge_and_stop)
        nats_url = settings.bus.nats_url
        if args.no_metering or not nats_url:
            if not args.no_metering:
                print("metald: no bus.nats_url, metering off", file=sys.stderr, flush=True)
            await stop.wait()
            return
        metering = build_metering(settings, md.meter_targets, nats_url)
        # never retire series on the way out: VMs still running (a restart, a purge cut
        # short) are metered on by the next start; deleted ones were retired as they went
        await metering.run(stop, retire=False)

    asyncio.run(run())
    if purge and not purged:
        md.shutdown()  # the purge failed or was interrupted: once more, errors shown
    elif not purge:
        md.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
