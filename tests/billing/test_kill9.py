"""kill -9 the aggregator process at random moments while batches flow through a real
nats-server: the final bill and row counts equal the reference; nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

from sqlalchemy.orm import Session

from unkey_deploy.billing.aggregator import Aggregator
from unkey_deploy.billing.service import LoopStats, run_consumer
from unkey_deploy.bus.jetstream import connect
from unkey_deploy.bus.server import NatsServer
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.config import BusConfig
from unkey_deploy.metering import stream as mstream
from unkey_deploy.metering.codec import encode
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db

from .harness import assert_bills_match, directory
from .scenarios import make_series, raw_of, to_batches

HOUR = 3_600_000_000_000


def _customers(data_dir: Path) -> dict[str, tuple[Decimal, Decimal]]:
    engine = db.make_engine(f"sqlite:///{data_dir / 'control.db'}")
    db.upgrade(engine)
    terms = {}
    with Session(engine) as s:
        for name, pct, bal in (
            ("acme", Decimal("15.00"), Decimal("0.10")),
            ("globex", Decimal(0), Decimal(0)),
        ):
            c = cp.create_customer(s, name, now=time.time(), discount_pct=pct, credit_balance=bal)
            terms[c.id] = (pct, bal)
        s.commit()
    engine.dispose()
    return terms


def _spawn(data_dir: Path, url: str, n: int) -> subprocess.Popen[bytes]:
    """Start the aggregator process and return once it consumes (its log says so)."""
    logf = data_dir / f"aggregator-{n}.log"
    with logf.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "unkey_deploy.billing.service",
                "--data-dir",
                str(data_dir),
                "--nats-url",
                url,
                "--ack-wait-s",
                "2",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while b"billing aggregator running" not in logf.read_bytes():
        assert proc.poll() is None, logf.read_text()
        assert time.monotonic() < deadline, "aggregator did not start"
        time.sleep(0.05)
    return proc


def test_kill9_at_random_moments_bills_exactly_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    rng = random.Random(11)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    terms = _customers(data_dir)
    ids = sorted(terms)
    start = (time.time_ns() // HOUR - 1) * HOUR - 60 * 10**9  # recent: crosses an hour edge
    series = [
        make_series(rng, ids[i % 2], f"vm_{i}", "i1", start + i * 10**9, 1500, gap_every=500)
        for i in range(6)
    ] + [make_series(rng, ids[0], "vm_0", "i2", start + 400 * 10**9, 900)]  # a restart
    batches = [b for s in series for b in to_batches(s, 100)]
    rng.shuffle(batches)  # producers are independent: any interleaving
    msgs = [
        mstream.batch_message(b.key.customer_id, b.batch_id, encode(b), len(b.samples))
        for b in batches
    ]

    async def publish_and_kill() -> None:
        bus = await connect(nats_server.url)
        await bus.ensure_stream(mstream.stream_spec(BusConfig()))
        proc = _spawn(data_dir, nats_server.url, 0)
        kills = 0
        sent = 0
        try:
            while kills < 10:
                chunk = msgs[sent : sent + rng.randint(5, 15)]
                if chunk:
                    res = await bus.publish_many(chunk)
                    assert all(not isinstance(r, Exception) for r in res)
                    sent += len(chunk)
                await asyncio.sleep(rng.uniform(0.05, 1.0))
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                # sometimes a batch is published again (a producer retry after a lost PubAck)
                if sent and rng.random() < 0.5:
                    await bus.publish_many([msgs[rng.randrange(sent)]])
                proc = await asyncio.to_thread(_spawn, data_dir, nats_server.url, kills)
            if sent < len(msgs):
                await bus.publish_many(msgs[sent:])
            await asyncio.sleep(1.0)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            await bus.close()
        assert kills == 10

    asyncio.run(publish_and_kill())

    # Drain what is left in this process, then compare with the reference.
    storage = ChdbStorage(data_dir / "clickhouse")
    try:
        storage.migrate()

        async def drain() -> LoopStats:
            bus = await connect(nats_server.url)
            agg = Aggregator(storage, directory(terms))
            stop = asyncio.Event()
            stats = LoopStats()
            task = asyncio.create_task(run_consumer(bus, agg, stop, ack_wait_s=2, stats=stats))
            quiet_since = time.monotonic()
            last = -1
            while time.monotonic() - quiet_since < 5.0:  # > ack_wait: redeliveries are in
                await asyncio.sleep(0.5)
                if stats.acked != last or agg.held_handles():
                    last = stats.acked
                    quiet_since = time.monotonic()
            stop.set()
            await task
            await bus.close()
            return stats

        committed_by_the_killed = storage.processed_batches(b.batch_id for b in batches)
        asyncio.run(drain())
        # the killed processes did commit work (the kills hit a working aggregator; how much
        # depends on the machine's load: under a full parallel test run, little)
        assert committed_by_the_killed, "every kill hit an aggregator that had committed nothing"
        assert_bills_match(storage, raw_of(series), terms)
        n_raw = storage.query("SELECT count() AS n FROM metrics_raw")[0]["n"]
        assert int(n_raw) == sum(len(s.samples) for s in series)
        q = storage.query("SELECT count() AS n FROM metrics_quarantine")[0]["n"]
        assert int(q) == 0
        dup = storage.query(
            "SELECT count() AS n FROM (SELECT vm_id, instance_id, timestamp, count() AS c "
            "FROM metrics_raw GROUP BY ALL HAVING c > 1)"
        )[0]["n"]
        assert int(dup) == 0
    finally:
        storage.close()
