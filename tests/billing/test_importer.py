"""``unkey usage import`` run again: the module says importing the same file twice bills it
once, and the error it gives when NATS does not take everything says to run it again."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from pathlib import Path

from unkey_deploy.billing.importer import import_file_sync
from unkey_deploy.bus.jetstream import connect
from unkey_deploy.bus.server import NatsServer
from unkey_deploy.metering import stream as mstream

from .scenarios import MONTH_EDGE_NS, make_series, raw_of


def _stored(url: str) -> int:
    async def count() -> int:
        bus = await connect(url)
        try:
            return await bus.stream_message_count(mstream.STREAM_NAME)
        finally:
            await bus.close()

    return asyncio.run(count())


def test_importing_the_same_file_twice_sends_it_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    rng = random.Random(5)
    series = [
        make_series(rng, "cust_a", "vm_1", "i1", MONTH_EDGE_NS, 700),
        make_series(rng, "cust_a", "vm_2", "i1", MONTH_EDGE_NS, 90),
    ]
    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps(r.__dict__) + "\n" for r in raw_of(series)))
    spool = tmp_path / "spool"
    first = import_file_sync(f, nats_url=nats_server.url, spool_dir=spool)
    assert first.samples_accepted == 790 and first.batches_published == 3
    assert _stored(nats_server.url) == 3
    # the second run used to fail: "series vm_1:i1 was stopped; a restart is a new instance id"
    again = import_file_sync(f, nats_url=nats_server.url, spool_dir=spool)
    assert again.samples_accepted == 0 and again.samples_rejected == 790
    assert again.batches_published == 0
    assert _stored(nats_server.url) == 3
    # a longer file later: only its new samples go, continuing each series' batch numbers
    last = series[1].samples[-1]
    more = make_series(rng, "cust_a", "vm_2", "i1", last.t, 10)
    more.samples = [
        dataclasses.replace(
            x,
            cpu_time_ns=last.cpu_time_ns + x.cpu_time_ns,
            net_rx_bytes=last.net_rx_bytes + x.net_rx_bytes,
            net_tx_bytes=last.net_tx_bytes + x.net_tx_bytes,
            disk_read_bytes=last.disk_read_bytes + x.disk_read_bytes,
            disk_write_bytes=last.disk_write_bytes + x.disk_write_bytes,
        )
        for x in more.samples
    ]
    extra = raw_of([more])
    with f.open("a") as out:
        out.write("".join(json.dumps(r.__dict__) + "\n" for r in extra))
    third = import_file_sync(f, nats_url=nats_server.url, spool_dir=spool)
    assert third.samples_accepted == 10 and third.batches_published == 1
    assert _stored(nats_server.url) == 4
