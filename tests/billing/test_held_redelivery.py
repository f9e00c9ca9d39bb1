"""A batch held for its missing predecessor and delivered again by JetStream (its ack wait ran
out while held, e.g. behind a slow commit) must stay unacked until it is applied."""

from __future__ import annotations

import asyncio
import random
import time

from unkey_deploy.billing.aggregator import Aggregator, Incoming
from unkey_deploy.bus.interface import ConsumerSpec
from unkey_deploy.bus.jetstream import connect
from unkey_deploy.bus.server import NatsServer
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.config import BusConfig
from unkey_deploy.metering import stream as mstream
from unkey_deploy.metering.codec import encode

from .harness import TERMS, directory
from .scenarios import make_series, to_batches

HOUR = 3_600_000_000_000


def test_a_held_batch_delivered_again_is_not_acked_before_it_is_applied(
    storage: ChdbStorage, nats_server: NatsServer
) -> None:
    rng = random.Random(31)
    s = make_series(rng, "cust_a", "vm_1", "i1", time.time_ns() // HOUR * HOUR - HOUR, 1200)
    _b0, b1 = to_batches(s)

    async def run() -> list[int]:
        bus = await connect(nats_server.url)
        await bus.ensure_stream(mstream.stream_spec(BusConfig()))
        # seq 1 only: seq 0 is late, so seq 1 is held
        await bus.publish(mstream.batch_message("cust_a", b1.batch_id, encode(b1), 600))
        spec = ConsumerSpec(durable="agg", filter_subject=mstream.ALL_SUBJECTS, ack_wait_s=1.0)
        consumer = await bus.consumer(mstream.STREAM_NAME, spec)
        agg = Aggregator(storage, directory(TERMS))
        [d1] = await consumer.fetch(10, 2.0)
        out = agg.process([Incoming(d1, d1.data, False, d1.stream_seq)])
        assert out.held == 1 and out.ack == []
        await asyncio.sleep(1.5)  # no in_progress in time: JetStream delivers it again
        [d2] = await consumer.fetch(10, 2.0)
        assert d2.stream_seq == d1.stream_seq and d2.num_delivered == 2
        out = agg.process([Incoming(d2, d2.data, True, d2.stream_seq)])
        assert out.held == 1
        for d in out.ack:  # as the consumer loop settles a flush
            await d.ack()
        # the aggregator dies now, before seq 0 came: the held batch must come again
        await consumer.close()
        consumer = await bus.consumer(mstream.STREAM_NAME, spec)
        await asyncio.sleep(1.5)
        again = await consumer.fetch(10, 2.0)
        await consumer.close()
        await bus.close()
        return [d.stream_seq for d in again]

    assert asyncio.run(run()) == [1]
