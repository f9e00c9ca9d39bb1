"""The JetStream transport against a real nats-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from unkey_deploy.bus import ConsumerSpec, NatsServer, OutMessage, StreamSpec, connect
from unkey_deploy.core.config import BusConfig
from unkey_deploy.core.errors import DeadlineExceeded, Unavailable
from unkey_deploy.metering import stream as mstream

SPEC = StreamSpec(name="TEST", subjects=("test.>",), duplicate_window_s=60, max_age_s=3600)


def test_publish_dedupes_by_msg_id_and_consumer_acks(nats_server: NatsServer) -> None:
    async def main() -> None:
        bus = await connect(nats_server.url)
        try:
            await bus.ensure_stream(SPEC)
            first = await bus.publish(OutMessage("test.a", b"one", "id-1", {"X-K": "v"}))
            again = await bus.publish(OutMessage("test.a", b"one", "id-1"))
            assert not first.duplicate and again.duplicate and again.seq == first.seq
            results = await bus.publish_many(
                [OutMessage("test.b", f"m{i}".encode(), f"many-{i}") for i in range(500)]
                + [OutMessage("test.b", b"m0", "many-0")]
            )
            assert all(not isinstance(r, Exception) for r in results)
            assert [r.duplicate for r in results if not isinstance(r, Exception)].count(True) == 1
            assert await bus.stream_message_count("TEST") == 501

            consumer = await bus.consumer("TEST", ConsumerSpec("c1", "test.>", ack_wait_s=2))
            got = await consumer.fetch(1000, 2.0)
            assert len(got) == 501
            assert got[0].msg_id == "id-1" and got[0].data == b"one"
            assert got[0].headers["X-K"] == "v" and got[0].num_delivered == 1
            for m in got[1:]:
                await m.ack()
            await got[0].nak()
            redelivered = await consumer.fetch(10, 2.0)
            assert [m.msg_id for m in redelivered] == ["id-1"]
            assert redelivered[0].num_delivered == 2
            await redelivered[0].term()
            assert await consumer.fetch(10, 0.5) == []
            await consumer.close()
        finally:
            await bus.close()

    asyncio.run(main())


def test_unacked_messages_survive_a_consumer_and_server_restart(nats_server: NatsServer) -> None:
    async def main() -> None:
        bus = await connect(nats_server.url)
        await bus.ensure_stream(SPEC)
        await bus.publish_many([OutMessage("test.x", b"d", f"k{i}") for i in range(10)])
        c = await bus.consumer("TEST", ConsumerSpec("dur", "test.>"))
        got = await c.fetch(4, 2.0)
        for m in got:
            await m.ack()
        await bus.close()
        nats_server.stop()
        nats_server.start()
        bus = await connect(nats_server.url)
        c = await bus.consumer("TEST", ConsumerSpec("dur", "test.>"))
        rest = await c.fetch(100, 2.0)
        assert sorted(m.msg_id or "" for m in rest) == sorted(f"k{i}" for i in range(4, 10))
        await bus.close()

    asyncio.run(main())


def test_outage_raises_retryable_errors_then_recovers(nats_server: NatsServer) -> None:
    async def main() -> None:
        bus = await connect(nats_server.url)
        await bus.ensure_stream(SPEC)
        nats_server.stop()
        with pytest.raises((Unavailable, DeadlineExceeded)) as exc:
            await bus.publish(OutMessage("test.a", b"x", "during"), timeout_s=0.5)
        assert exc.value.retryable
        results = await bus.publish_many([OutMessage("test.a", b"x", "m")], timeout_s=0.5)
        assert isinstance(results[0], Unavailable | DeadlineExceeded)
        nats_server.start()
        for _ in range(100):
            try:
                await bus.publish(OutMessage("test.a", b"x", "after"), timeout_s=0.5)
                break
            except (Unavailable, DeadlineExceeded):
                await asyncio.sleep(0.1)
        assert await bus.stream_message_count("TEST") == 1
        await bus.close()

    asyncio.run(main())


def test_connect_to_nothing_is_unavailable(tmp_path: Path) -> None:
    server = NatsServer(tmp_path)
    server.start()
    url = server.url
    server.stop()
    with pytest.raises(Unavailable, match="no servers"):
        asyncio.run(connect(url))


def test_metering_stream_settings_are_code(nats_server: NatsServer) -> None:
    cfg = BusConfig(max_age_s=7200, duplicate_window_s=600)

    async def main() -> None:
        bus = await connect(nats_server.url)
        await bus.ensure_stream(mstream.stream_spec(cfg))
        js = bus._js  # read back what the server stored
        info = await js.stream_info(mstream.STREAM_NAME)
        assert info.config.max_age == 7200
        assert info.config.duplicate_window == 600
        assert info.config.subjects == ["billing.metrics.raw.>"]
        # changing the code changes the stream
        await bus.ensure_stream(mstream.stream_spec(BusConfig(max_age_s=3600)))
        info = await js.stream_info(mstream.STREAM_NAME)
        assert info.config.max_age == 3600
        await bus.close()

    asyncio.run(main())
    with pytest.raises(Exception, match="subject token"):
        mstream.subject_for("cust.with.dots")


def test_nats_url_selects_external_server_else_starts_local(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    from unkey_deploy.bus import resolve_nats

    data = tmp_path / "data"
    url, started = resolve_nats(BusConfig(nats_url=nats_server.url), data)
    assert url == nats_server.url and started is None
    assert not (data / "nats").exists()
    url, started = resolve_nats(BusConfig(), data)
    try:
        assert started is not None and started.running and url != nats_server.url
        assert (data / "nats" / "url").read_text().strip() == url

        async def ping() -> int:
            bus = await connect(url)
            await bus.ensure_stream(SPEC)
            n = await bus.stream_message_count("TEST")
            await bus.close()
            return n

        assert asyncio.run(ping()) == 0
    finally:
        if started:
            started.stop()
