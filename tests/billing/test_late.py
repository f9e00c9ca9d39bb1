"""Late batches (BILLING.md: "A late or corrected batch recomputes the row for its hour; the
newer row replaces the older"): a batch that comes after the aggregator stopped waiting for it
(hold timeout, its seq skipped) is applied in its place, and every billing_hourly row equals what
in-order delivery gives, whatever the order, duplicates, restarts and crashes mid-commit."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Any

import pyarrow as pa
import pytest

from unkey_deploy.billing.aggregator import Aggregator, Incoming
from unkey_deploy.clickhouse.api import BillingHourlyRow
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage

from .harness import (
    HOLD,
    HOUR,
    TERMS,
    Clock,
    assert_bills_match,
    assert_hours_match,
    directory,
    encode,
    hourly,
)
from .scenarios import Series, make_series, raw_of, to_batches


def _recent_start() -> int:
    # two minutes before an hour boundary, inside the raw TTL
    return (time.time_ns() // HOUR - 1) * HOUR - 120 * 10**9


def _series(seed: int, start: int) -> list[Series]:
    rng = random.Random(seed)
    return [
        make_series(rng, "cust_a", "vm_1", "i1", start, 3000, gap_every=450, invalid_every=211),
        make_series(rng, "cust_a", "vm_2", "i1", start + 30 * 10**9, 2400, vcpus=1),
        make_series(rng, "cust_b", "vm_3", "i1", start - 10**11, 3600, vcpus=4, invalid_every=173),
    ]


def _replays(caplog: pytest.LogCaptureFixture) -> int:
    return sum("applied by a replay" in r.getMessage() for r in caplog.records)


def _count(storage: ChdbStorage, sql: str) -> int:
    return int(storage.query(sql)[0]["n"])


def test_batch_held_past_the_timeout_then_delivered_corrects_its_hours(
    storage: ChdbStorage,
) -> None:
    # place the hour boundary in the middle of batch 2 (samples 1200..1799)
    probe = _series(11, 0)[0]
    series = _series(11, (time.time_ns() // HOUR) * HOUR - probe.samples[1500].t)
    s = series[0]
    batches = [encode(b) for b in to_batches(s)]  # 5 batches of 60 s; #2 crosses the hour
    hour_of_2 = {x.t // HOUR for x in s.samples[1200:1800]}
    assert len(hour_of_2) == 2, "batch 2 should cross an hour boundary"
    clock = Clock()
    agg = Aggregator(storage, directory(TERMS), hold_timeout_s=HOLD, monotonic=clock)
    out = agg.process([Incoming(0, batches[0]), Incoming(1, batches[1])])
    assert sorted(out.ack) == [0, 1]
    out = agg.process([Incoming(3, batches[3]), Incoming(4, batches[4])])
    assert out.ack == [] and out.held == 2  # waiting for batch 2
    clock.now += HOLD + 1
    out = agg.process([])
    assert sorted(out.ack) == [3, 4] and out.held == 0  # applied without batch 2
    without = raw_of([Series(s.key, s.samples[:1200] + s.samples[1800:])])
    assert_bills_match(storage, without, TERMS)
    # a restart in between: the skip and the checkpoint are in ClickHouse, not in memory
    agg = Aggregator(storage, directory(TERMS), hold_timeout_s=HOLD, monotonic=clock)
    out = agg.process([Incoming(2, batches[2], redelivered=True)])
    assert out.ack == [2] and out.term == []
    assert_bills_match(storage, raw_of([s]), TERMS)
    assert_hours_match(storage, [s])
    # its samples are billed, not quarantined (only the scenario's invalid ones are)
    reasons = storage.query("SELECT DISTINCT reason FROM metrics_quarantine")
    assert {r["reason"] for r in reasons} <= {
        "memory_over_allocation",
        "counter_decreased",
        "cpu_over_100_percent",
    }
    # the series has nothing left to wait for, and a redelivery of batch 2 is a duplicate
    state = storage.query(
        "SELECT skipped, checkpoint FROM billing_series_state FINAL WHERE vm_id = 'vm_1'"
    )
    assert state == [{"skipped": [], "checkpoint": ""}]
    before = hourly(storage)
    out = agg.process([Incoming(9, batches[2], redelivered=True)])
    assert out.ack == [9] and hourly(storage) == before


def test_a_batch_that_came_broken_is_not_waited_for(storage: ChdbStorage) -> None:
    """A batch whose body is corrupt but whose header names it (quarantined whole) will not come
    intact: the series goes on without it at once instead of holding its next batches for
    ``hold_timeout_s``. Should it come intact after all (re-sent), it is a late batch."""
    s = _series(13, _recent_start())[1]
    batches = [encode(b) for b in to_batches(s)]  # 4 batches of 60 s
    corrupt = bytearray(batches[1])
    corrupt[-20] ^= 0xFF  # inside the zstd frame: the body fails its checksum
    clock = Clock()  # never advances: no hold timeout can be what releases batches 2 and 3
    agg = Aggregator(storage, directory(TERMS), hold_timeout_s=HOLD, monotonic=clock)
    out = agg.process([Incoming(0, batches[0]), Incoming(1, bytes(corrupt))])
    assert out.ack == [0] and out.term == [1]
    out = agg.process([Incoming(2, batches[2]), Incoming(3, batches[3])])
    assert sorted(out.ack) == [2, 3] and out.held == 0
    (q,) = storage.query("SELECT batch_id, reason FROM metrics_quarantine")
    assert q["batch_id"] == f"{s.key.vm_id}:{s.key.instance_id}:1"
    assert q["reason"].startswith("invalid_batch: invalid metering batch: body: ")
    assert_bills_match(storage, raw_of([Series(s.key, s.samples[:600] + s.samples[1200:])]), TERMS)
    # re-sent intact: placed where it belongs, the bill becomes the whole series'
    out = agg.process([Incoming(4, batches[1])])
    assert out.ack == [4]
    assert_bills_match(storage, raw_of([s]), TERMS)
    assert_hours_match(storage, [s])


@pytest.mark.parametrize(("seed", "size"), [(12, 600), (31, 250), (47, 130)])
def test_random_order_with_skips_restarts_and_duplicates_bills_like_in_order(
    storage: ChdbStorage, caplog: pytest.LogCaptureFixture, seed: int, size: int
) -> None:
    caplog.set_level(logging.INFO, logger="unkey_deploy.billing.aggregator")
    series = _series(seed, _recent_start())
    msgs = [encode(b) for s in series for b in to_batches(s, size)]
    rng = random.Random(seed + 1)
    stream = msgs + rng.sample(msgs, 8)
    rng.shuffle(stream)
    clock = Clock()

    def new() -> Aggregator:
        return Aggregator(storage, directory(TERMS), hold_timeout_s=HOLD, monotonic=clock)

    agg = new()
    pending = list(enumerate(stream))
    acked: set[int] = set()
    rounds = 0
    while pending or agg.held_handles():
        rounds += 1
        take = pending[: rng.randint(1, 3)]
        pending = pending[len(take) :]
        out = agg.process([Incoming(i, m, redelivered=rounds > 1) for i, m in take])
        acked.update(out.ack)
        if rng.random() < 0.5:
            clock.now += HOLD + 1  # what is held now is applied without its predecessors
            acked.update(agg.process([]).ack)
        assert out.term == []
        if rounds % 9 == 0:  # a restart: held messages come back later (redelivery)
            lost = [(i, m) for i, m in enumerate(stream) if i not in acked]
            lost = [x for x in lost if x[0] not in dict(pending)]
            agg = new()
            pending += lost
        if not pending and agg.held_handles():
            clock.now += HOLD + 1
    assert acked == set(range(len(stream)))
    assert _replays(caplog) >= 2, "the scenario should have skipped and replayed batches"
    assert_bills_match(storage, raw_of(series), TERMS)
    assert_hours_match(storage, series)
    assert (
        _count(
            storage, "SELECT count() AS n FROM billing_series_state FINAL WHERE length(skipped) > 0"
        )
        == 0
    )


class Crash(Exception):
    """The process died here (kill -9 between two writes)."""


class CrashingStorage:
    """The real storage, except that one write in ``every`` raises before it happens."""

    def __init__(self, inner: ChdbStorage, rng: random.Random, every: int) -> None:
        self.inner = inner
        self.rng = rng
        self.every = every
        self.crashes = 0

    def _maybe(self) -> None:
        if self.rng.randrange(self.every) == 0:
            self.crashes += 1
            raise Crash

    def insert_raw(self, table: pa.Table, token: str | None = None) -> int:
        self._maybe()
        return self.inner.insert_raw(table, token)

    def insert_quarantine(self, table: pa.Table, token: str | None = None) -> int:
        self._maybe()
        return self.inner.insert_quarantine(table, token)

    def upsert_billing_hourly(self, rows: list[BillingHourlyRow]) -> int:
        self._maybe()
        return self.inner.upsert_billing_hourly(rows)

    def mark_processed(self, ids: Any) -> None:
        self._maybe()
        self.inner.mark_processed(ids)

    def command(self, sql: str) -> None:
        self._maybe()
        self.inner.command(sql)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_crashes_mid_commit_of_late_batches_neither_lose_nor_double(
    storage: ChdbStorage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="unkey_deploy.billing.aggregator")
    series = _series(14, _recent_start())[:2]
    msgs = [encode(b) for s in series for b in to_batches(s, 150)]
    rng = random.Random(15)
    order = list(range(len(msgs)))
    rng.shuffle(order)
    crashing = CrashingStorage(storage, random.Random(16), every=8)
    clock = Clock()

    def new() -> Aggregator:
        return Aggregator(crashing, directory(TERMS), hold_timeout_s=HOLD, monotonic=clock)  # type: ignore[arg-type]

    agg = new()
    acked: set[int] = set()
    pending = list(order)
    for _ in range(3000):
        if len(acked) == len(msgs):
            break
        take, pending = pending[:2], pending[2:]
        if not take or rng.random() < 0.4:
            clock.now += HOLD + 1  # held batches are applied without their predecessors
        try:
            out = agg.process([Incoming(i, msgs[i], redelivered=True) for i in take])
        except Crash:
            # kill -9: memory gone; the bus redelivers everything not acked, in another order
            agg = new()
            pending = [i for i in range(len(msgs)) if i not in acked]
            rng.shuffle(pending)
            continue
        acked.update(out.ack)
    assert acked == set(range(len(msgs)))
    assert crashing.crashes >= 10
    assert _replays(caplog) >= 2
    assert_bills_match(storage, raw_of(series), TERMS)
    assert_hours_match(storage, series)


def test_a_batch_later_than_the_horizon_is_quarantined_not_billed(storage: ChdbStorage) -> None:
    rng = random.Random(17)
    s = make_series(rng, "cust_b", "vm_9", "i1", _recent_start(), 1800)
    b0, b1, b2 = (encode(b) for b in to_batches(s))
    clock = Clock()
    wall = [time.time_ns()]
    agg = Aggregator(
        storage,
        directory(TERMS),
        hold_timeout_s=HOLD,
        late_horizon_s=3600,
        monotonic=clock,
        wall_ns=lambda: wall[0],
    )
    agg.process([Incoming(0, b0), Incoming(2, b2)])
    clock.now += HOLD + 1
    agg.process([])
    wall[0] += 3601 * 10**9
    out = agg.process([Incoming(1, b1)])
    assert out.ack == [1]
    rows = storage.query(
        "SELECT reason, count() AS n FROM metrics_quarantine WHERE batch_id = 'vm_9:i1:1' "
        "GROUP BY reason"
    )
    assert [(r["reason"], int(r["n"])) for r in rows] == [("arrived_after_horizon", 600)]
    assert_bills_match(storage, raw_of([Series(s.key, s.samples[:600] + s.samples[1200:])]), TERMS)


def test_a_late_batch_that_invalidates_later_samples_quarantines_them(
    storage: ChdbStorage,
) -> None:
    rng = random.Random(18)
    s = make_series(rng, "cust_b", "vm_8", "i1", _recent_start(), 3000)
    x = list(s.samples)
    # batch 2's last sample jumps the disk counter; in order, every later sample is lower than
    # it (a counter going down) until batch 4, where the counter catches up again
    jump = x[2400].disk_write_bytes + 1
    x[1799] = dataclasses.replace(x[1799], disk_write_bytes=jump)
    x[2400:] = [
        dataclasses.replace(v, disk_write_bytes=v.disk_write_bytes + jump) for v in x[2400:]
    ]
    s = Series(s.key, x)
    b = [encode(v) for v in to_batches(s)]
    clock = Clock()
    agg = Aggregator(storage, directory(TERMS), hold_timeout_s=HOLD, monotonic=clock)
    agg.process([Incoming(0, b[0]), Incoming(1, b[1]), Incoming(3, b[3]), Incoming(4, b[4])])
    clock.now += HOLD + 1
    agg.process([])
    assert _count(storage, "SELECT count() AS n FROM metrics_quarantine") == 0
    out = agg.process([Incoming(2, b[2])])
    assert out.ack == [2]
    assert_bills_match(storage, raw_of([s]), TERMS)
    assert_hours_match(storage, [s])
    rows = storage.query(
        "SELECT batch_id, reason, count() AS n FROM metrics_quarantine GROUP BY batch_id, reason"
    )
    assert [(r["batch_id"], r["reason"], int(r["n"])) for r in rows] == [
        ("vm_8:i1:3", "counter_decreased", 600)
    ]


def test_a_seq_far_ahead_of_its_series_is_quarantined_at_once(storage: ChdbStorage) -> None:
    # A header's seq is any u64. One far ahead of its series (corrupt or hostile) made every
    # prepare() build set(range(next_seq, seq)) to see whether the gap was all broken batches
    # (10^7: 2 s and ~0.5 GB per flush; 10^12: never returns), and would have been held, then
    # "skipped" with every seq in between.
    rng = random.Random(41)
    s = make_series(rng, "cust_a", "vm_1", "i1", _recent_start(), 1800)
    b0, b1, b2 = to_batches(s)
    stray = [
        dataclasses.replace(b1, seq=10**7),  # the same series, far ahead
        dataclasses.replace(  # a new series whose first batch says seq 2^64 - 1
            b1, key=dataclasses.replace(b1.key, vm_id="vm_2"), seq=2**64 - 1
        ),
    ]
    clock = Clock()
    agg = Aggregator(storage, directory(TERMS), monotonic=clock)
    agg.process([Incoming("b0", encode(b0))])
    t0 = time.monotonic()
    out = agg.process([Incoming(f"x{i}", encode(b)) for i, b in enumerate(stray)])
    assert time.monotonic() - t0 < 2
    assert sorted(out.ack) == ["x0", "x1"] and out.held == 0 and out.term == []
    rows = storage.query(
        "SELECT batch_id, reason, count() AS n FROM metrics_quarantine "
        "GROUP BY batch_id, reason ORDER BY batch_id"
    )
    assert [(r["batch_id"], r["reason"], int(r["n"])) for r in rows] == [
        ("vm_1:i1:10000000", "seq_out_of_range", 600),
        (f"vm_2:i1:{2**64 - 1}", "seq_out_of_range", 600),
    ]
    clock.now += 2 * HOLD  # nothing waits for them: the series goes on as before
    out = agg.process([Incoming("b1", encode(b1)), Incoming("b2", encode(b2))])
    assert sorted(out.ack) == ["b1", "b2"] and out.held == 0
    assert_bills_match(storage, raw_of([s]), TERMS)
