"""The billing service: the aggregator's JetStream consumer loop, and the query side.

Who owns the usage store
------------------------
chDB (the default, embedded) lets ONE process open its path. So the billing service owns it and
serves queries for everyone: in the local stack (``unkey dev up``) the billing service runs
inside the gatewayd process (:func:`start_in_process` on gatewayd's event loop), and gatewayd's
billing routes (:mod:`.http`) call :class:`~.queries.BillingQueries` directly. With a ClickHouse
server (``billing.clickhouse_url``) any number of processes may open the store, so the
aggregator can run on its own (``python -m unkey_deploy.billing.service``) and gatewayd queries
the server directly.

Loop: fetch up to ``max_msgs`` messages, lingering up to ``linger_s`` until ``min_samples``
samples are in hand (inserts of 10k+ rows), apply them (:meth:`Aggregator.process`, in a worker
thread), then ack what was committed. Held messages (waiting for an earlier batch of their
series) are kept alive with ``in_progress`` so JetStream does not redeliver them meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bus.interface import Bus, Consumer, Delivery
from ..bus.jetstream import connect
from ..clickhouse.api import Storage
from ..clickhouse.factory import storage_from_settings
from ..core import config as core_config
from ..core import log as corelog
from ..core import metrics
from ..core.clock import SYSTEM_CLOCK, Clock
from ..core.errors import UnkeyError
from ..metering import stream as mstream
from ..store import db
from .aggregator import Aggregator, Incoming, Prepared, Settled
from .customers import CustomerDirectory, SqlDirectory
from .ledger import InvoiceLedger
from .queries import BillingQueries

log = logging.getLogger(__name__)
# The aggregator's JetStream ack wait: a batch it fetched but did not acknowledge (it died, or
# the store failed) is delivered again after this long; batches after it wait meanwhile.
ACK_WAIT_S = 30.0


@dataclass
class LoopStats:
    flushes: int = 0
    samples: int = 0
    acked: int = 0
    termed: int = 0


async def run_consumer(
    bus: Bus,
    agg: Aggregator,
    stop: asyncio.Event,
    *,
    bus_config: core_config.BusConfig | None = None,
    durable: str = "billing-aggregator",
    ack_wait_s: float = ACK_WAIT_S,
    max_msgs: int = 2000,
    min_samples: int = 10_000,
    linger_s: float = 0.25,
    stats: LoopStats | None = None,
) -> LoopStats:
    """Consume until ``stop`` is set. Errors from the store (retryable) leave the messages
    unacked: they come back after ``ack_wait_s``."""
    stats = stats or LoopStats()
    stream = mstream.stream_spec(bus_config or core_config.BusConfig())
    cspec = mstream.consumer_spec(durable=durable, ack_wait_s=ack_wait_s)
    consumer: Consumer | None = None
    while consumer is None:  # NATS or JetStream may not answer yet: wait for it, do not end
        try:
            await bus.ensure_stream(stream)
            consumer = await bus.consumer(mstream.STREAM_NAME, cspec)
        except UnkeyError as exc:
            log.warning("billing: cannot make the stream's consumer yet: %s", exc)
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation
            waiter = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter}, timeout=1.0)
            finally:
                waiter.cancel()
            if stop.is_set():
                return stats
    loop = asyncio.get_running_loop()
    last_touch = loop.time()
    inflight: asyncio.Task[Settled] | None = None
    try:
        while not stop.is_set():
            msgs: list[Delivery] = []
            samples = 0
            deadline = loop.time() + linger_s
            while len(msgs) < max_msgs and samples < min_samples and not stop.is_set():
                wait = max(0.01, deadline - loop.time()) if msgs else 0.5
                try:
                    got = await consumer.fetch(max_msgs - len(msgs), timeout_s=wait)
                except UnkeyError as exc:
                    log.warning("billing: fetch failed: %s", exc)
                    await asyncio.sleep(0.5)
                    got = []
                    # NATS may be back without the stream and this consumer (a new server, a
                    # lost store): make them again (binds to the durable when it still exists)
                    with contextlib.suppress(UnkeyError):
                        await bus.ensure_stream(stream)
                        fresh = await bus.consumer(mstream.STREAM_NAME, cspec)
                        with contextlib.suppress(Exception):
                            await consumer.close()
                        consumer = fresh
                msgs += got
                samples += sum(_samples_hint(m) for m in got)
                if not got or loop.time() >= deadline:
                    break
            if not msgs and not agg.held_handles() and inflight is None:
                continue
            items = [Incoming(m, m.data, m.num_delivered > 1, m.stream_seq) for m in msgs]
            # Prepare this flush while the previous one is being written (chDB works outside
            # the GIL), then write flushes strictly in order.
            prepared = None
            reset = False
            try:
                if items or agg.held_handles():
                    prepared = await asyncio.to_thread(agg.prepare, items)
            except UnkeyError as exc:
                log.warning("billing: prepare failed (%s); messages will be redelivered", exc)
                reset = True
            except Exception:  # a bug: said loudly, and the loop goes on (it used to end)
                log.exception("billing: prepare failed unexpectedly; messages will be redelivered")
                reset = True
            if inflight is not None:
                ok = await _settle(inflight, stats)
                inflight = None
                if not ok:
                    reset = True
            if reset:
                # in-memory states ran ahead of the store: start over from the store
                agg.forget()
                await asyncio.sleep(1.0)
                continue
            if prepared is not None:
                inflight = asyncio.create_task(asyncio.to_thread(_commit, agg, prepared))
            if loop.time() - last_touch > ack_wait_s / 3:
                last_touch = loop.time()
                await asyncio.gather(
                    *(d.in_progress() for d in agg.held_handles()), return_exceptions=True
                )
        if inflight is not None:
            await _settle(inflight, stats)
    finally:
        with contextlib.suppress(Exception):
            await consumer.close()
    return stats


def _commit(agg: Aggregator, prepared: Prepared) -> Settled:
    t0 = time.monotonic()
    out = agg.commit(prepared)
    metrics.FLUSH_SECONDS.observe(time.monotonic() - t0)
    return out


async def _settle(task: asyncio.Task[Settled], stats: LoopStats) -> bool:
    """Wait for a flush's commit, then ack/term its messages. False if the commit failed
    (nothing acked: the bus redelivers)."""
    try:
        out = await task
    except UnkeyError as exc:
        log.warning("billing: commit failed (%s); messages will be redelivered", exc)
        return False
    except Exception:  # a bug: said loudly, and the loop goes on (it used to end)
        log.exception("billing: commit failed unexpectedly; messages will be redelivered")
        return False
    await asyncio.gather(*(d.ack() for d in out.ack), return_exceptions=True)
    await asyncio.gather(*(d.term() for d in out.term), return_exceptions=True)
    stats.flushes += 1
    stats.samples += out.samples
    stats.acked += len(out.ack)
    stats.termed += len(out.term)
    metrics.BATCHES_PROCESSED.inc(len(out.ack))
    metrics.BATCHES_QUARANTINED.inc(len(out.term))
    return True


def _samples_hint(m: Delivery) -> int:
    try:
        return int(m.headers.get(mstream.SAMPLES_HEADER, "600"))
    except ValueError:
        return 600


@dataclass
class BillingRuntime:
    """A running billing service: ``queries`` for the gateway, ``stop()`` to shut it down."""

    storage: Storage
    queries: BillingQueries
    aggregator: Aggregator
    task: asyncio.Task[Any] | None
    stop_event: asyncio.Event
    bus: Bus | None = None

    async def stop(self) -> None:
        self.stop_event.set()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 30)
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await self.bus.close()
        await asyncio.to_thread(self.storage.close)


BusFactory = Callable[[], Awaitable[Bus]]


async def start_in_process(
    settings: core_config.Settings,
    *,
    nats_url: str | None = None,
    directory: CustomerDirectory | None = None,
    storage: Storage | None = None,
    clock: Clock = SYSTEM_CLOCK,
    consume: bool = True,
    ack_wait_s: float = ACK_WAIT_S,
) -> BillingRuntime:
    """Open the usage store (migrated), and start the aggregator's consumer on the running event
    loop when a NATS URL is known. For gatewayd: put ``runtime.queries`` on
    ``app.state.billing`` and ``await runtime.stop()`` at shutdown."""
    if storage is None:
        storage = storage_from_settings(settings)
    await asyncio.to_thread(storage.migrate)
    factory = db.session_factory(db.make_engine(settings.resolved_database_url))
    if directory is None:
        directory = SqlDirectory(factory)
    agg = await asyncio.to_thread(
        Aggregator,
        storage,
        directory,
        pricing_version=settings.billing.pricing_version,
        series_idle_s=settings.billing.series_idle_s,
        series_retention_s=settings.billing.series_retention_s,
    )
    queries = BillingQueries(storage, directory, clock, InvoiceLedger(factory, clock))
    stop = asyncio.Event()
    url = nats_url or settings.bus.nats_url
    task = None
    bus = None
    if consume and url:
        bus = await connect(url, name="billing-aggregator")
        task = asyncio.create_task(
            run_consumer(bus, agg, stop, bus_config=settings.bus, ack_wait_s=ack_wait_s)
        )
    return BillingRuntime(storage, queries, agg, task, stop, bus)


def run_billing_service(
    settings: core_config.Settings, *, nats_url: str | None = None, ack_wait_s: float = ACK_WAIT_S
) -> None:
    """Run the aggregator in this process until SIGTERM/SIGINT (a process of its own)."""

    async def main() -> None:
        rt = await start_in_process(settings, nats_url=nats_url, ack_wait_s=ack_wait_s)
        stop = rt.stop_event
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if rt.task is None:
            raise SystemExit("billing: no NATS URL (set bus.nats_url or pass --nats-url)")
        log.info("billing aggregator running")
        await stop.wait()
        await rt.stop()

    asyncio.run(main())


def _main() -> None:
    ap = argparse.ArgumentParser(description="unkey billing aggregator")
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--nats-url", required=True)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--ack-wait-s", type=float, default=30.0)
    args = ap.parse_args()
    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    if args.database_url:
        overrides["database_url"] = args.database_url
    settings = core_config.load(environ=os.environ, **overrides)
    corelog.configure("billing", settings.log_level)
    metrics.serve(settings.metrics.billing, metrics.BILLING)
    t0 = time.monotonic()
    run_billing_service(settings, nats_url=args.nats_url, ack_wait_s=args.ack_wait_s)
    log.info("billing aggregator stopped after %.1f s", time.monotonic() - t0)


if __name__ == "__main__":
    _main()
