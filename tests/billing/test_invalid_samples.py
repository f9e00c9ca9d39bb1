"""BILLING.md "Cleaning" 3: an invalid sample is quarantined with its reason and never billed,
the rest of its batch is billed exactly (deltas against the last valid sample), and the series
goes on without waiting; a structurally broken batch is rejected whole, quarantined with the
fault named and the message kept, and termed only once that row is committed."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import struct
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from unkey_deploy.billing.aggregator import Aggregator, Incoming
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.metering.codec import Encoder, InvalidBatch, decode, samples_to_array
from unkey_deploy.metering.model import Batch

from .harness import assert_bills_match, directory
from .reference import series_hours
from .scenarios import MONTH_EDGE_NS, Series, make_series, raw_of, to_batches

TERMS = {"cust_a": (Decimal("5.00"), Decimal("0.01"))}
GIB = 2**30


def _lenient(b: Batch) -> bytes:
    return Encoder().encode_array(b.key, b.seq, samples_to_array(b.samples), check=False)


def test_invalid_samples_are_quarantined_one_by_one_and_the_rest_billed(
    storage: ChdbStorage,
) -> None:
    rng = random.Random(21)
    s = make_series(rng, "cust_a", "vm_q", "i1", MONTH_EDGE_NS, 1200, vcpus=1, mem_total=GIB)
    x = list(s.samples)
    r = dataclasses.replace
    x[100] = r(x[100], net_rx_bytes=x[99].net_rx_bytes - 1)  # a counter goes down
    x[200] = r(x[200], cpu_time_ns=x[199].cpu_time_ns + 3 * (x[200].t - x[199].t))  # 300 % CPU
    x[300] = r(x[300], memory_used_bytes=GIB + 1)  # above the allocation
    x[500] = r(x[500], memory_used_bytes=-1)  # not a reading
    x[650] = r(x[650], disk_write_bytes=0)  # batch 1: lower than the last valid one
    dup = r(x[400], cpu_time_ns=x[400].cpu_time_ns + 1)  # the same t again, other values
    samples = [*x[:401], dup, *x[401:]]
    s = Series(s.key, samples)
    b0 = Batch(s.key, 0, tuple(samples[:601]))
    b1 = Batch(s.key, 1, tuple(samples[601:]))
    for b in (b0, b1):  # the strict decoder (metering's own checks) refuses both batches
        with pytest.raises(InvalidBatch):
            decode(_lenient(b))
    agg = Aggregator(storage, directory(TERMS))
    out = agg.process([Incoming(0, _lenient(b0)), Incoming(1, _lenient(b1))])
    assert sorted(out.ack) == [0, 1] and out.term == [] and out.held == 0
    rows = storage.query(
        "SELECT batch_id, toUnixTimestamp64Nano(timestamp) AS t, reason, sample_json "
        "FROM metrics_quarantine ORDER BY t, reason"
    )
    got = [(q["batch_id"], int(q["t"]), q["reason"]) for q in rows]
    assert got == [
        ("vm_q:i1:0", x[100].t, "counter_decreased"),
        ("vm_q:i1:0", x[200].t, "cpu_over_100_percent"),
        ("vm_q:i1:0", x[300].t, "memory_over_allocation"),
        ("vm_q:i1:0", x[400].t, "duplicate_timestamp"),
        ("vm_q:i1:0", x[500].t, "negative_value"),
        ("vm_q:i1:1", x[650].t, "counter_decreased"),
    ]
    assert json.loads(rows[3]["sample_json"])["cpu_time_ns"] == dup.cpu_time_ns  # the 2nd copy
    assert json.loads(rows[4]["sample_json"])["memory_used_bytes"] == -1
    # what is billed equals the independent reference, hour by hour and on the invoice
    assert_bills_match(storage, raw_of([s]), TERMS)
    hours, valid, invalid = series_hours(raw_of([s]))
    assert (valid, invalid) == (1201 - 1 - 5, 5)  # the duplicate is not a sample of its own
    billed = storage.query("SELECT sum(sample_count) AS n FROM billing_hourly FINAL")
    assert int(billed[0]["n"]) == valid == sum(u["n"] for u in hours.values())


def _broken(msg: bytes) -> dict[str, bytes]:
    head = struct.calcsize("<4sHHQqqIIQ")
    corrupt = bytearray(msg)
    corrupt[-20] ^= 0xFF  # inside the zstd frame (its checksum catches it)
    return {
        "header": msg[: head - 3],
        "magic": b"XXXX" + msg[4:],
        "version": msg[:4] + struct.pack("<H", 9) + msg[6:],
        "body_length": msg + b"\x00",
        "body": bytes(corrupt),
    }


@pytest.mark.parametrize(
    ("fault", "loc"),
    [
        ("header", "header"),
        ("magic", "magic"),
        ("version", "version"),
        ("body_length", "body_length"),
        ("body", "body"),
    ],
)
def test_a_structurally_broken_batch_is_rejected_whole_and_kept(
    storage: ChdbStorage, fault: str, loc: str
) -> None:
    rng = random.Random(22)
    s = make_series(rng, "cust_a", "vm_b", "i1", MONTH_EDGE_NS, 600)
    (b,) = to_batches(s)
    msg = _broken(_lenient(b))[fault]
    out = Aggregator(storage, directory(TERMS)).process([Incoming("m", msg)])
    assert out.term == ["m"] and out.ack == [] and out.samples == 0
    (row,) = storage.query("SELECT batch_id, reason, sample_json FROM metrics_quarantine")
    assert row["reason"].startswith(f"invalid_batch: invalid metering batch: {loc}: ")
    kept = json.loads(row["sample_json"])
    assert base64.b64decode(kept["data_base64"]) == msg and kept["bytes"] == len(msg)
    # a body fault leaves the header readable: the row names the batch
    assert row["batch_id"] == ("vm_b:i1:0" if fault == "body" else "")
    assert int(storage.query("SELECT count() AS n FROM billing_hourly")[0]["n"]) == 0


class FailingQuarantine:
    """The real storage whose quarantine insert fails (ClickHouse unavailable)."""

    def __init__(self, inner: ChdbStorage) -> None:
        self.inner = inner

    def insert_quarantine(self, table: pa.Table, token: str | None = None) -> int:
        raise OSError("ClickHouse is unavailable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_broken_batch_is_termed_only_after_its_quarantine_row_is_committed(
    storage: ChdbStorage,
) -> None:
    agg = Aggregator(FailingQuarantine(storage), directory(TERMS))  # type: ignore[arg-type]
    with pytest.raises(OSError, match="unavailable"):
        agg.process([Incoming("m", b"UKMB\x01garbage")])  # nothing to term: redelivered later
    out = Aggregator(storage, directory(TERMS)).process([Incoming("m", b"UKMB\x01garbage")])
    assert out.term == ["m"]
    assert int(storage.query("SELECT count() AS n FROM metrics_quarantine")[0]["n"]) == 1


def test_samples_sent_again_under_new_seqs_are_ignored_without_quarantine(
    storage: ChdbStorage,
) -> None:
    # what importing the same file twice looks like: the same samples, batch ids that go on
    rng = random.Random(23)
    s = make_series(rng, "cust_a", "vm_r", "i1", MONTH_EDGE_NS, 1200)
    first = to_batches(s)
    again = [dataclasses.replace(b, seq=b.seq + len(first)) for b in first]
    agg = Aggregator(storage, directory(TERMS))
    agg.process([Incoming(b.seq, _lenient(b)) for b in first])
    out = agg.process([Incoming(b.seq, _lenient(b)) for b in again])
    assert sorted(out.ack) == [2, 3]
    assert int(storage.query("SELECT count() AS n FROM metrics_quarantine")[0]["n"]) == 0
    assert_bills_match(storage, raw_of([s]), TERMS)


def test_a_cfs_burst_over_100_percent_is_quarantined_and_its_cpu_billed_with_the_next_sample(
    storage: ChdbStorage,
) -> None:
    # A busy 4-vCPU guest sampled every ~100 ms, unaligned with the 100 ms CFS period: a window
    # now and then holds a little more than vcpus x dt of CPU (a burst, 5 ms per vCPU here) and
    # the next one as much less. BILLING.md "Cleaning" 3 makes any sample over 100 % against
    # the previous valid one invalid, with no tolerance (changing that is a change of what a
    # bill means: BILLING.md and a new pricing version, see docs/billing.md), so the burst is
    # quarantined; the next sample is valid against the last valid one and carries its CPU.
    rng = random.Random(24)
    vcpus = 4
    s = make_series(rng, "cust_a", "vm_cfs", "i1", MONTH_EDGE_NS, 1200, vcpus=vcpus)
    x = list(s.samples)
    cpu, t_prev, bursts = 0, x[0].t, []
    for i in range(1, len(x)):
        dt = x[i].t - t_prev
        used = vcpus * dt  # 100 % busy
        if i % 50 == 0:
            used += vcpus * 5_000_000
            bursts.append(i)
        elif i % 50 == 1:
            used -= vcpus * 5_000_000
        cpu += used
        t_prev = x[i].t
        x[i] = dataclasses.replace(x[i], cpu_time_ns=cpu)
    x[0] = dataclasses.replace(x[0], cpu_time_ns=0)
    s = Series(s.key, x)
    agg = Aggregator(storage, directory(TERMS))
    out = agg.process([Incoming(b.seq, _lenient(b)) for b in to_batches(s)])
    assert sorted(out.ack) == [0, 1]
    rows = storage.query(
        "SELECT toUnixTimestamp64Nano(timestamp) AS t, reason FROM metrics_quarantine ORDER BY t"
    )
    assert [(int(r["t"]), r["reason"]) for r in rows] == [
        (x[i].t, "cpu_over_100_percent") for i in bursts
    ]
    billed = storage.query(
        "SELECT sum(cpu_time_ns) AS cpu, sum(sample_count) AS n FROM billing_hourly FINAL"
    )[0]
    assert int(billed["cpu"]) == x[-1].cpu_time_ns  # all CPU used, to the ns: nothing lost
    assert int(billed["n"]) == len(x) - len(bursts)
    assert_bills_match(storage, raw_of([s]), TERMS)
