"""The aggregator's consumer loop rides out outages of what it reads: nothing is acked while a
flush cannot be computed, and everything is billed once the outage is over."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from unkey_deploy.billing.aggregator import Aggregator
from unkey_deploy.billing.customers import SqlDirectory
from unkey_deploy.billing.service import LoopStats, run_consumer
from unkey_deploy.bus.jetstream import connect
from unkey_deploy.bus.server import NatsServer
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.config import BusConfig
from unkey_deploy.metering import stream as mstream
from unkey_deploy.metering.codec import encode
from unkey_deploy.metering.model import Batch
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db

from .harness import TERMS, assert_bills_match, directory
from .scenarios import make_series, raw_of, to_batches

HOUR = 3_600_000_000_000


async def _publish(url: str, *batches: Batch) -> None:
    """Publish ``batches`` as billaged does (the stream made if need be)."""
    bus = await connect(url)
    await bus.ensure_stream(mstream.stream_spec(BusConfig()))
    for b in batches:
        await bus.publish(mstream.batch_message(b.key.customer_id, b.batch_id, encode(b),
                                                len(b.samples)))  # fmt: skip
    await bus.close()


@contextlib.asynccontextmanager
async def _consuming(
    url: str, agg: Aggregator
) -> AsyncIterator[tuple[LoopStats, asyncio.Task[LoopStats]]]:
    """The aggregator's consumer loop on ``url``, stopped (and awaited) at the end."""
    bus = await connect(url)
    stop = asyncio.Event()
    stats = LoopStats()
    task = asyncio.create_task(run_consumer(bus, agg, stop, ack_wait_s=2, stats=stats))
    try:
        yield stats, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await bus.close()


async def _until_billed(
    stats: LoopStats, task: asyncio.Task[LoopStats], samples: int, timeout: float = 30
) -> None:
    """Until the loop has billed ``samples`` (or ``timeout``), failing if it ended."""
    deadline = time.monotonic() + timeout
    while stats.samples < samples and time.monotonic() < deadline:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.1)


def test_a_control_plane_database_outage_does_not_stop_the_consumer(
    tmp_path: Path, storage: ChdbStorage, nats_server: NatsServer
) -> None:
    # The control-plane database (customers, VMs) is down when the batches come: the directory
    # raised SQLAlchemy's OperationalError, which is no UnkeyError, so it went through the loop
    # and ended the consumer task for good (billing stopped until a restart).
    ready = tmp_path / "ready"
    ready.mkdir()
    engine = db.make_engine(f"sqlite:///{ready / 'control.db'}")
    db.upgrade(engine)
    with Session(engine) as s:
        c = cp.create_customer(s, "acme", now=time.time())
        s.commit()
    engine.dispose()
    live = tmp_path / "live"  # where the directory looks: absent until the "outage" ends
    directory = SqlDirectory(db.session_factory(db.make_engine(f"sqlite:///{live / 'control.db'}")))
    live.rmdir()  # make_engine made it: without it, SQLite cannot open the database file
    rng = random.Random(3)
    start = time.time_ns() // HOUR * HOUR - HOUR
    series = make_series(rng, c.id, "vm_1", "i1", start, 1800)

    async def run() -> LoopStats:
        await _publish(nats_server.url, *to_batches(series))
        async with _consuming(nats_server.url, Aggregator(storage, directory)) as (stats, task):
            await asyncio.sleep(3)  # fetched, failed on the database, not acked
            assert not task.done(), task.exception()
            assert stats.acked == 0
            ready.rename(live)  # the database is back
            await _until_billed(stats, task, len(series.samples), timeout=60)
        return stats

    stats = asyncio.run(run())
    assert stats.samples == len(series.samples) and stats.termed == 0
    assert_bills_match(storage, raw_of([series]), {c.id: (Decimal(0), Decimal(0))})


def test_nats_back_without_the_stream_the_consumer_is_made_again(
    tmp_path: Path, storage: ChdbStorage, nats_server: NatsServer
) -> None:
    # NATS restarted with an empty store (a new server, a lost volume): billaged makes the
    # stream again and publishes, but the aggregator's pull consumer was gone with the store
    # and every fetch failed ("ServiceUnavailable") until the aggregator was restarted.
    rng = random.Random(4)
    start = time.time_ns() // HOUR * HOUR - HOUR
    series = make_series(rng, "cust_a", "vm_1", "i1", start, 1800)
    b0, b1, b2 = to_batches(series)

    async def run() -> LoopStats:
        await _publish(nats_server.url, b0)
        agg = Aggregator(storage, directory(TERMS))
        async with _consuming(nats_server.url, agg) as (stats, task):
            await _until_billed(stats, task, 600)
            assert stats.samples == 600
            nats_server.stop()
            shutil.rmtree(nats_server.store_dir / "jetstream")
            nats_server.start()
            await _publish(nats_server.url, b1, b2)
            await _until_billed(stats, task, 1800)
        return stats

    stats = asyncio.run(run())
    assert stats.samples == 1800
    assert_bills_match(storage, raw_of([series]), TERMS)


def test_nats_away_when_the_consumer_starts_is_waited_for(
    tmp_path: Path, storage: ChdbStorage, nats_server: NatsServer
) -> None:
    # The loop ensured the stream and made its consumer once, before its retry loop: NATS (or
    # JetStream) not answering at that moment ended the task for good, and the billing service
    # running in gatewayd went on without a consumer, silently.
    rng = random.Random(6)
    start = time.time_ns() // HOUR * HOUR - HOUR
    series = make_series(rng, "cust_a", "vm_1", "i1", start, 600)
    (b0,) = to_batches(series)

    async def run() -> LoopStats:
        agg = Aggregator(storage, directory(TERMS))
        async with _consuming(nats_server.url, agg) as (stats, task):
            nats_server.stop()  # (the loop's connection made: it is the stream it waits for)
            await asyncio.sleep(3)
            assert not task.done(), task.exception()
            nats_server.start()
            await _publish(nats_server.url, b0)
            await _until_billed(stats, task, 600)
        return stats

    assert asyncio.run(run()).samples == 600
    assert_bills_match(storage, raw_of([series]), TERMS)


def test_an_unexpected_error_in_a_flush_does_not_end_the_consumer(
    storage: ChdbStorage, nats_server: NatsServer
) -> None:
    """A bug in prepare or commit (an error that is no UnkeyError) went through the loop and
    ended the consumer task, silently inside gatewayd: billing stopped until a restart. It is
    logged, the flush's messages are redelivered, and they are billed once it passes."""
    rng = random.Random(5)
    start = time.time_ns() // HOUR * HOUR - HOUR
    series = make_series(rng, "cust_a", "vm_1", "i1", start, 1800)
    failures = {"prepare": 2, "commit": 2}

    class Flaky(Aggregator):
        def prepare(self, items: Any) -> Any:
            if failures["prepare"]:
                failures["prepare"] -= 1
                raise KeyError("a bug in prepare")
            return super().prepare(items)

        def commit(self, prepared: Any) -> Any:
            if failures["commit"]:
                failures["commit"] -= 1
                raise ZeroDivisionError("a bug in commit")
            return super().commit(prepared)

    async def run() -> LoopStats:
        await _publish(nats_server.url, *to_batches(series))
        agg = Flaky(storage, directory(TERMS))
        async with _consuming(nats_server.url, agg) as (stats, task):
            await _until_billed(stats, task, len(series.samples), timeout=60)
        return stats

    stats = asyncio.run(run())
    assert failures == {"prepare": 0, "commit": 0}
    assert stats.samples == len(series.samples) and stats.termed == 0
    assert_bills_match(storage, raw_of([series]), TERMS)
