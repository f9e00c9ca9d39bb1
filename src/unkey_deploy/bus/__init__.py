"""Message bus: a small interface (:mod:`.interface`) and its NATS JetStream transport.

Use :func:`connect` to get a :class:`Bus`; :class:`NatsServer` runs a local ``nats-server``.
"""

from __future__ import annotations

from .interface import (
    MSG_ID_HEADER,
    Bus,
    Consumer,
    ConsumerSpec,
    Delivery,
    OutMessage,
    PublishResult,
    StreamSpec,
)
from .jetstream import JetStreamBus, connect
from .server import NatsServer, nats_server_binary, resolve_nats

__all__ = [
    "MSG_ID_HEADER",
    "Bus",
    "Consumer",
    "ConsumerSpec",
    "Delivery",
    "JetStreamBus",
    "NatsServer",
    "OutMessage",
    "PublishResult",
    "StreamSpec",
    "connect",
    "nats_server_binary",
    "resolve_nats",
]
