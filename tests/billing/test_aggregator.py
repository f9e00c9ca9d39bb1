"""The aggregator over real chDB: bills equal the reference whatever the delivery order,
duplicates, late batches and restarts."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from unkey_deploy.billing.aggregator import Aggregator, Incoming, Versioner
from unkey_deploy.clickhouse import queries as chq
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.metering.codec import Encoder, encode, samples_to_array
from unkey_deploy.metering.model import Batch, Sample, SeriesKey

from .harness import assert_bills_match, directory
from .scenarios import MONTH_EDGE_NS, make_series, raw_of, to_batches

HOUR = 3_600_000_000_000
TERMS = {"cust_a": (Decimal("10.00"), Decimal("0.05")), "cust_b": (Decimal(0), Decimal(0))}


def _scenario(seed: int, start: int = MONTH_EDGE_NS) -> tuple[list, list[bytes]]:
    rng = random.Random(seed)
    series = [
        make_series(rng, "cust_a", "vm_1", "i1", start, 2400, gap_every=333),
        make_series(rng, "cust_a", "vm_1", "i2", start + 300 * 10**9, 1800),
        make_series(
            rng,
            "cust_b",
            "vm_2",
            "i1",
            start - 10**12,
            3000,
            vcpus=4,
            mem_total=2**34,
            gap_every=900,
        ),
    ]
    msgs = [encode(b) for s in series for b in to_batches(s)]
    return series, msgs


def _rows(storage: ChdbStorage, table: str) -> int:
    return int(storage.query(f"SELECT count() AS n FROM {table}")[0]["n"])  # noqa: S608


def test_in_order_delivery_bills_exactly(storage: ChdbStorage) -> None:
    series, msgs = _scenario(1)
    agg = Aggregator(storage, directory(TERMS))
    out = agg.process([Incoming(i, m) for i, m in enumerate(msgs)])
    assert sorted(out.ack) == list(range(len(msgs))) and out.held == 0
    assert out.samples == sum(len(s.samples) for s in series)
    # cust_a crosses into November, cust_b stays in October
    assert assert_bills_match(storage, raw_of(series), TERMS) == 3
    # raw rows older than the 7-day TTL are dropped at insert: these are a month old
    assert _rows(storage, "metrics_raw") == 0
    assert _rows(storage, "billing_hourly FINAL") == out.billing_rows == 4


def test_shuffled_duplicated_late_and_restarted_delivery_gives_the_same_bill(
    storage: ChdbStorage,
) -> None:
    # recent data (inside the raw TTL), crossing an hour boundary
    start = (time.time_ns() // HOUR - 1) * HOUR - 150 * 10**9
    series, msgs = _scenario(2, start)
    rng = random.Random(3)
    stream = msgs + rng.sample(msgs, 10)  # duplicates
    rng.shuffle(stream)  # out of order; the first batch of a series may come last (late)
    agg = Aggregator(storage, directory(TERMS))
    pending = list(enumerate(stream))
    acked: set[int] = set()
    rounds = 0
    while pending:
        rounds += 1
        take = pending[: rng.randint(1, 6)]
        pending = pending[len(take) :]
        out = agg.process([Incoming(i, m, redelivered=rounds > 1) for i, m in take])
        acked.update(out.ack)
        if rounds % 7 == 0:  # a restart: in-memory state and held messages are gone...
            lost = [
                (i, m) for i, m in enumerate(stream) if i not in acked and i not in dict(pending)
            ]
            agg = Aggregator(storage, directory(TERMS))
            pending += lost  # ...and the bus redelivers what was not acked
    assert acked == set(range(len(stream)))
    assert_bills_match(storage, raw_of(series), TERMS)
    assert _rows(storage, "metrics_raw") == sum(len(s.samples) for s in series)


def test_unknown_customer_and_vm_are_quarantined(storage: ChdbStorage) -> None:
    rng = random.Random(4)
    s = make_series(rng, "cust_zz", "vm_9", "i1", MONTH_EDGE_NS, 700)
    agg = Aggregator(storage, directory(TERMS))
    out = agg.process([Incoming(i, encode(b)) for i, b in enumerate(to_batches(s))])
    assert len(out.ack) == 2
    rows = storage.query("SELECT reason, count() AS n FROM metrics_quarantine GROUP BY reason")
    assert [(r["reason"], int(r["n"])) for r in rows] == [("unknown_customer", 700)]
    assert _rows(storage, "billing_hourly") == 0


def test_cpu_over_100_is_quarantined_and_not_billed(storage: ChdbStorage) -> None:
    # billaged's encoder refuses falling counters and memory over the allocation inside a
    # batch, so the invalid samples live metering sends are CPU jumps (the counter keeps the
    # jump: samples stay invalid until elapsed time covers it) and whatever crosses batch
    # boundaries; the others are covered by test_invalid_samples.py.
    rng = random.Random(5)
    s = make_series(rng, "cust_b", "vm_3", "i1", MONTH_EDGE_NS, 1200, vcpus=1)
    jump = 3 * 10**8  # 0.3 s of one vCPU within a 0.1 s interval
    s.samples = [
        dataclasses.replace(x, cpu_time_ns=x.cpu_time_ns + jump * (i // 300))
        for i, x in enumerate(s.samples)
    ]
    agg = Aggregator(storage, directory(TERMS))
    agg.process([Incoming(i, encode(b)) for i, b in enumerate(to_batches(s))])
    rows = storage.query("SELECT reason, count() AS n FROM metrics_quarantine GROUP BY reason")
    assert [r["reason"] for r in rows] == ["cpu_over_100_percent"]
    assert int(rows[0]["n"]) >= 3  # one jump at samples 300, 600 and 900
    assert_bills_match(storage, raw_of([s]), TERMS)


def test_undecodable_batch_is_termed_and_quarantined(storage: ChdbStorage) -> None:
    agg = Aggregator(storage, directory(TERMS))
    out = agg.process([Incoming("bad", b"UKMB\x01garbage")])
    assert out.term == ["bad"] and out.ack == []
    rows = storage.query("SELECT reason FROM metrics_quarantine")
    assert len(rows) == 1 and rows[0]["reason"].startswith("invalid_batch: invalid metering batch")


def test_allocation_change_within_an_instance_is_quarantined(storage: ChdbStorage) -> None:
    rng = random.Random(8)
    s = make_series(rng, "cust_a", "vm_7", "i1", MONTH_EDGE_NS, 1200)
    first, second = to_batches(s)
    changed = dataclasses.replace(
        second, key=dataclasses.replace(second.key, memory_total_bytes=8 * 2**30)
    )
    Aggregator(storage, directory(TERMS)).process([Incoming(0, encode(first))])
    # after a restart the allocation comes from the stored state
    Aggregator(storage, directory(TERMS)).process([Incoming(1, encode(changed))])
    rows = storage.query("SELECT reason, count() AS n FROM metrics_quarantine GROUP BY reason")
    assert [(r["reason"], int(r["n"])) for r in rows] == [("allocation_changed", 600)]
    assert_bills_match(storage, raw_of([dataclasses.replace(s, samples=s.samples[:600])]), TERMS)


def test_a_batch_claiming_more_vcpus_than_storage_holds_is_quarantined_not_a_crash(
    storage: ChdbStorage,
) -> None:
    # metrics_raw.vcpus is UInt16: a header claiming 70000 vCPUs (hostile or corrupt, from a
    # known customer) used to raise OverflowError out of prepare(), which killed the consumer
    # loop (it only survives UnkeyError) and came back with every redelivery.
    rng = random.Random(9)
    good = make_series(rng, "cust_a", "vm_1", "i1", MONTH_EDGE_NS, 600)
    huge = make_series(rng, "cust_a", "vm_2", "i1", MONTH_EDGE_NS, 600, vcpus=70_000)
    bad = Encoder().encode_array(
        huge.key, 0, samples_to_array(huge.samples), check=False
    )  # as a producer that skips the encoder's check would send it
    agg = Aggregator(storage, directory(TERMS))
    out = agg.process([Incoming("good", encode(to_batches(good)[0])), Incoming("bad", bad)])
    assert out.ack == ["good"] and out.term == ["bad"]
    rows = storage.query("SELECT reason, sample_json FROM metrics_quarantine")
    assert len(rows) == 1 and "vcpus: must be 1..65535, got 70000" in rows[0]["reason"]
    assert base64.b64decode(json.loads(rows[0]["sample_json"])["data_base64"]) == bad  # kept
    assert_bills_match(storage, raw_of([good]), TERMS)


def test_a_restart_after_the_wall_clock_stepped_back_loses_no_usage(storage: ChdbStorage) -> None:
    # Versions (billing_hourly, billing_series_state: the largest wins) come from the wall
    # clock. An aggregator restarted after NTP stepped the clock back a minute wrote its rows
    # with versions below the ones already stored: the hour kept the row from before the
    # restart (the second batch's usage lost) and the series' state went back a batch.
    rng = random.Random(12)
    s = make_series(rng, "cust_a", "vm_1", "i1", MONTH_EDGE_NS - 10 * 60 * 10**9, 1800)
    b0, b1, b2 = (encode(b) for b in to_batches(s))
    wall = [time.time_ns()]

    def aggregator() -> Aggregator:  # a process start: a new Versioner from the same clock
        return Aggregator(
            storage,
            directory(TERMS),
            wall_ns=lambda: wall[0],
            versioner=Versioner(lambda: wall[0]),
        )

    aggregator().process([Incoming(0, b0)])
    wall[0] -= 60 * 10**9
    aggregator().process([Incoming(1, b1)])
    wall[0] += 10**9
    aggregator().process([Incoming(2, b2)])  # reads the series' state back from storage
    assert_bills_match(storage, raw_of([s]), TERMS)


def test_raw_intervals_of_a_large_vm_hold_exact_memory_byte_ns(storage: ChdbStorage) -> None:
    # metrics_raw.mem_byte_ns was a UInt64, and a.memory_used x dt passes 2^64 for 32 GiB held
    # 0.6 s (17 GiB for a whole second): the raw rows wrapped, and hour_usage() (documented as
    # recomputing an hour exactly) said 1.95e19 where billing_hourly says 1.86e20.
    gib = 2**30
    key = SeriesKey("cust_a", "vm_1", "i1", 8, 64 * gib)
    t0 = (time.time_ns() // HOUR - 1) * HOUR + 10**9
    samples = tuple(
        Sample(t0 + i * 600_000_000, i * 10**8, 32 * gib + i, 0, 0, 0, 0) for i in range(10)
    )
    Aggregator(storage, directory(TERMS)).process([Incoming(0, encode(Batch(key, 0, samples)))])
    exact = sum(samples[i - 1].memory_used_bytes * 600_000_000 for i in range(1, 10))
    hour = datetime.fromtimestamp(t0 // HOUR * 3600, UTC)
    (u,) = chq.hour_usage(
        storage, customer_id="cust_a", vm_id="vm_1", start=hour, end=hour + timedelta(hours=1)
    )
    assert u.mem_byte_ns == exact
    billed = storage.query("SELECT toString(mem_byte_ns) AS m FROM billing_hourly FINAL")
    assert int(billed[0]["m"]) == exact
