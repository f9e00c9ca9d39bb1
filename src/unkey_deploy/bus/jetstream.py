"""The NATS JetStream transport of the :mod:`bus <unkey_deploy.bus.interface>` interface."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from ..core.errors import DeadlineExceeded, InvalidInput, Unavailable, UnkeyError
from .interface import (
    MSG_ID_HEADER,
    Consumer,
    ConsumerSpec,
    Delivery,
    OutMessage,
    PublishResult,
    StreamSpec,
)

_RETENTION = {
    "limits": js_api.RetentionPolicy.LIMITS,
    "workqueue": js_api.RetentionPolicy.WORK_QUEUE,
    "interest": js_api.RetentionPolicy.INTEREST,
}
_STORAGE = {"file": js_api.StorageType.FILE, "memory": js_api.StorageType.MEMORY}


def _map_error(exc: BaseException, what: str) -> UnkeyError:
    """NATS failures as platform errors: transport trouble is retryable, bad requests are not."""
    if isinstance(exc, UnkeyError):
        return exc
    if isinstance(exc, nats.js.errors.BadRequestError):
        return InvalidInput(f"{what}: rejected by JetStream: {exc}")
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        return DeadlineExceeded(f"{what}: no answer from NATS in time")
    return Unavailable(
        f"{what}: NATS unavailable ({type(exc).__name__}: {exc})",
        suggestion="check that nats-server is running and reachable (bus.nats_url)",
    )


def stream_config(spec: StreamSpec) -> js_api.StreamConfig:
    return js_api.StreamConfig(
        name=spec.name,
        description=spec.description or None,
        subjects=list(spec.subjects),
        retention=_RETENTION[spec.retention],
        max_age=spec.max_age_s,
        max_bytes=spec.max_bytes,
        num_replicas=spec.replicas,
        duplicate_window=spec.duplicate_window_s,
        storage=_STORAGE[spec.storage],
        discard=js_api.DiscardPolicy.OLD,
    )


class _JsDelivery:
    __slots__ = ("_headers", "_msg")

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self._headers: Mapping[str, str] = dict(msg.headers or {})

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def msg_id(self) -> str | None:
        return self._headers.get(MSG_ID_HEADER)

    @property
    def num_delivered(self) -> int:
        return int(self._msg.metadata.num_delivered or 1)

    @property
    def stream_seq(self) -> int:
        return int(self._msg.metadata.sequence.stream)

    async def ack(self) -> None:
        try:
            await self._msg.ack_sync(timeout=5.0)
        except Exception as exc:
            raise _map_error(exc, "ack") from exc

    async def nak(self, delay_s: float | None = None) -> None:
        try:
            await self._msg.nak(delay=delay_s)
        except Exception as exc:
            raise _map_error(exc, "nak") from exc

    async def term(self) -> None:
        try:
            await self._msg.term()
        except Exception as exc:
            raise _map_error(exc, "term") from exc

    async def in_progress(self) -> None:
        try:
            await self._msg.in_progress()
        except Exception as exc:
            raise _map_error(exc, "in_progress") from exc


class _JsConsumer:
    def __init__(self, sub: JetStreamContext.PullSubscription) -> None:
        self._sub = sub

    async def fetch(self, max_msgs: int, timeout_s: float) -> list[Delivery]:
        try:
            msgs = await self._sub.fetch(batch=max_msgs, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except Exception as exc:
            raise _map_error(exc, "fetch") from exc
        return [_JsDelivery(m) for m in msgs]

    async def close(self) -> None:
        # The durable consumer stays on the server; only this subscription goes away.
        with contextlib.suppress(Exception):  # closing a dead connection is not an error
            await self._sub.unsubscribe()


class JetStreamBus:
    """A :class:`~unkey_deploy.bus.interface.Bus` over one NATS connection.

    The connection reconnects on its own forever; while it is down, calls raise ``Unavailable``
    or ``DeadlineExceeded`` after their timeout, and start working again once NATS is back."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._js = nc.jetstream()

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def ensure_stream(self, spec: StreamSpec) -> None:
        cfg = stream_config(spec)
        try:
            try:
                await self._js.stream_info(spec.name)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(cfg)
                return
            await self._js.update_stream(cfg)
        except Exception as exc:
            raise _map_error(exc, f"ensure stream {spec.name}") from exc

    @staticmethod
    def _headers(msg: OutMessage) -> dict[str, Any]:
        h: dict[str, Any] = dict(msg.headers)
        h[MSG_ID_HEADER] = msg.msg_id
        return h

    async def publish(self, msg: OutMessage, timeout_s: float = 5.0) -> PublishResult:
        try:
            ack = await self._js.publish(
                msg.subject, msg.data, timeout=timeout_s, headers=self._headers(msg)
            )
        except Exception as exc:
            raise _map_error(exc, f"publish {msg.msg_id}") from exc
        return PublishResult(stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate))

    async def publish_many(
        self, msgs: Sequence[OutMessage], timeout_s: float = 10.0
    ) -> list[PublishResult | UnkeyError]:
        if not self._nc.is_connected:
            err = Unavailable("publish: NATS not connected")
            return [err for _ in msgs]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        futs: list[asyncio.Future[js_api.PubAck] | UnkeyError] = []
        for m in msgs:
            try:
                futs.append(
                    await self._js.publish_async(
                        m.subject,
                        m.data,
                        headers=self._headers(m),
                        wait_stall=max(0.01, deadline - loop.time()),
                    )
                )
            except Exception as exc:
                futs.append(_map_error(exc, f"publish {m.msg_id}"))
        out: list[PublishResult | UnkeyError] = []
        for m, f in zip(msgs, futs, strict=True):
            if isinstance(f, UnkeyError):
                out.append(f)
                continue
            try:
                # On timeout wait_for cancels the future, which frees its slot in nats-py.
                ack = await asyncio.wait_for(f, max(0.001, deadline - loop.time()))
            except Exception as exc:
                out.append(_map_error(exc, f"publish {m.msg_id}"))
                continue
            out.append(PublishResult(stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate)))
        return out

    async def consumer(self, stream: str, spec: ConsumerSpec) -> Consumer:
        cfg = js_api.ConsumerConfig(
            durable_name=spec.durable,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_wait=spec.ack_wait_s,
            max_deliver=spec.max_deliver,
            max_ack_pending=spec.max_ack_pending,
            filter_subject=spec.filter_subject,
        )
        try:
            sub = await self._js.pull_subscribe(
                spec.filter_subject or "", durable=spec.durable, stream=stream, config=cfg
            )
        except Exception as exc:
            raise _map_error(exc, f"consumer {spec.durable} on {stream}") from exc
        return _JsConsumer(sub)

    async def stream_message_count(self, stream: str) -> int:
        try:
            info = await self._js.stream_info(stream)
        except Exception as exc:
            raise _map_error(exc, f"stream info {stream}") from exc
        return int(info.state.messages)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # already closed or never connected
            await self._nc.close()


async def connect(url: str, *, name: str = "unkey", connect_timeout_s: float = 2.0) -> JetStreamBus:
    """Connect to NATS at ``url`` (``nats://host:port``, or several comma-separated for a
    cluster). Raises ``Unavailable`` when no server answers now; once connected, the client
    reconnects forever by itself."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise InvalidInput(f"bus: empty NATS URL {url!r}")

    async def _quiet(_exc: Exception) -> None:
        # nats-py logs every reconnect failure through this callback; callers see the state
        # through errors from publish/fetch instead.
        return None

    try:
        nc = await nats.connect(
            servers=servers,
            name=name,
            connect_timeout=connect_timeout_s,
            allow_reconnect=True,
            # Bounded for the first connect (nats-py would otherwise retry it forever) ...
            max_reconnect_attempts=1,
            reconnect_time_wait=0.25,
            error_cb=_quiet,
        )
    except Exception as exc:
        raise _map_error(exc, f"connect {url}") from exc
    # ... and unbounded once connected: ride out any outage.
    nc.options["max_reconnect_attempts"] = -1
    return JetStreamBus(nc)
