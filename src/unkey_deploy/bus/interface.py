"""The message bus seam: publish with a message id, durable pull consumers with explicit acks.

The platform ships one transport, NATS JetStream (:mod:`unkey_deploy.bus.jetstream`); the
interface is kept small enough that a Kafka transport (the design says "Kafka/NATS") could sit
behind it: a stream is a topic, a durable consumer a consumer group, ``msg_id`` an idempotent
producer key, ``ack`` an offset commit.

Contract every transport keeps:

- ``publish`` returns only once the message is durably stored (JetStream: the PubAck);
  publishing the same ``msg_id`` again within the stream's duplicate window stores nothing and
  returns ``duplicate=True``.
- Transport failures raise :class:`~unkey_deploy.core.errors.Unavailable` (retryable) or
  :class:`~unkey_deploy.core.errors.DeadlineExceeded`; the caller keeps the message and retries.
- A consumer delivers each stored message at least once until it is ``ack``ed (or ``term``ed);
  ``ack`` returns once the server has recorded it. Consumers that must see each message once
  dedupe by ``msg_id`` on their side too (a message may be redelivered after an ack was lost).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..core.errors import UnkeyError

MSG_ID_HEADER = "Nats-Msg-Id"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A durable stream: where messages on ``subjects`` are stored, and for how long."""

    name: str
    subjects: tuple[str, ...]
    # limits: keep until max_age/max_bytes (replayable); workqueue: delete once acked.
    retention: Literal["limits", "workqueue", "interest"] = "limits"
    max_age_s: float = 7 * 24 * 3600
    max_bytes: int = -1
    replicas: int = 1
    duplicate_window_s: float = 3600
    storage: Literal["file", "memory"] = "file"
    description: str = ""


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A durable pull consumer: survives restarts of the consumer and of the server."""

    durable: str
    filter_subject: str | None = None
    # Redelivered when not acked within ack_wait (a consumer that is still working calls
    # in_progress()); -1: redeliver forever (a message is only dropped by term()).
    ack_wait_s: float = 60.0
    max_deliver: int = -1
    max_ack_pending: int = 20_000


@dataclass(frozen=True, slots=True)
class OutMessage:
    subject: str
    data: bytes
    msg_id: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PublishResult:
    stream: str
    seq: int
    duplicate: bool


class Delivery(Protocol):
    """One delivered message. Settle it with exactly one of ack / nak / term."""

    @property
    def subject(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def msg_id(self) -> str | None: ...
    @property
    def num_delivered(self) -> int:
        """1 on first delivery, more on redeliveries."""
        ...

    @property
    def stream_seq(self) -> int: ...

    async def ack(self) -> None:
        """Done with it; returns once the server recorded the ack."""
        ...

    async def nak(self, delay_s: float | None = None) -> None:
        """Not now: redeliver (after ``delay_s``)."""
        ...

    async def term(self) -> None:
        """Never deliver again (a poison message; the consumer keeps it aside itself)."""
        ...

    async def in_progress(self) -> None:
        """Still working on it: restart the ack_wait timer."""
        ...


class Consumer(Protocol):
    async def fetch(self, max_msgs: int, timeout_s: float) -> list[Delivery]:
        """Up to ``max_msgs`` messages; an empty list when none arrived within ``timeout_s``."""
        ...

    async def close(self) -> None: ...


class Bus(Protocol):
    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream, or update it to ``spec`` (settings are code, not ops state)."""
        ...

    async def publish(self, msg: OutMessage, timeout_s: float = 5.0) -> PublishResult: ...

    async def publish_many(
        self, msgs: Sequence[OutMessage], timeout_s: float = 10.0
    ) -> list[PublishResult | UnkeyError]:
        """Publish pipelined (many in flight); one result or error per message, in order."""
        ...

    async def consumer(self, stream: str, spec: ConsumerSpec) -> Consumer: ...

    async def stream_message_count(self, stream: str) -> int: ...

    async def close(self) -> None: ...
