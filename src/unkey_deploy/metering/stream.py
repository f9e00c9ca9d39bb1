"""Where metering batches travel: the JetStream stream, its subjects and message headers.

billaged publishes each encoded batch (:mod:`.codec`) to ``billing.metrics.raw.<customer_id>``
with the batch id ``<vm_id>:<instance_id>:<seq>`` as ``Nats-Msg-Id``; the billing aggregator
consumes the stream with a durable pull consumer (:func:`consumer_spec`) and acks a message only
after its rows are committed.
"""

from __future__ import annotations

from ..bus.interface import ConsumerSpec, OutMessage, StreamSpec
from ..core.config import BusConfig
from ..core.errors import InvalidInput
from .codec import FORMAT_VERSION, ID_RE

STREAM_NAME = "BILLING_METRICS"
SUBJECT_PREFIX = "billing.metrics.raw."
ALL_SUBJECTS = SUBJECT_PREFIX + ">"
FORMAT_HEADER = "Unkey-Metering-Format"
SAMPLES_HEADER = "Unkey-Samples"


def subject_for(customer_id: str) -> str:
    if not ID_RE.match(customer_id):
        raise InvalidInput(f"customer id {customer_id!r:.80} cannot be a subject token")
    return SUBJECT_PREFIX + customer_id


def stream_spec(cfg: BusConfig) -> StreamSpec:
    """The stream as code. Limits retention (not work-queue): batches stay replayable for
    ``max_age`` even after billing acked them, so an hour can be recomputed from the source."""
    return StreamSpec(
        name=STREAM_NAME,
        subjects=(ALL_SUBJECTS,),
        retention="limits",
        max_age_s=cfg.max_age_s,
        replicas=cfg.replicas,
        # JetStream refuses a duplicate window longer than max_age.
        duplicate_window_s=min(cfg.duplicate_window_s, cfg.max_age_s),
        storage="file",
        description="raw VM metering batches (unkey_deploy.metering.codec)",
    )


def consumer_spec(durable: str = "billing-aggregator", ack_wait_s: float = 60.0) -> ConsumerSpec:
    return ConsumerSpec(durable=durable, filter_subject=ALL_SUBJECTS, ack_wait_s=ack_wait_s)


def batch_message(customer_id: str, batch_id: str, data: bytes, samples: int) -> OutMessage:
    return OutMessage(
        subject=subject_for(customer_id),
        data=data,
        msg_id=batch_id,
        headers={FORMAT_HEADER: str(FORMAT_VERSION), SAMPLES_HEADER: str(samples)},
    )
