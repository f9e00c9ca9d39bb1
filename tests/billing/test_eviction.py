"""The aggregator's memory is bounded: the in-memory state of a series idle for longer than
``series_idle_s`` is dropped (it is in storage), and a series that sends again after that (its
next batch, a late one that fills a skipped seq, a redelivered duplicate) is billed exactly as
if its state had stayed in memory: the same rows in every billing table."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import pytest

from unkey_deploy.billing.aggregator import Aggregator, Incoming, SeriesHashes
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.errors import InvalidInput

from .harness import (
    HOLD,
    HOUR,
    TERMS,
    Clock,
    assert_bills_match,
    assert_hours_match,
    directory,
    encode,
)
from .scenarios import Series, make_series, raw_of, to_batches

IDLE = 300.0


def test_idle_series_leave_memory_and_only_recent_ones_stay(storage: ChdbStorage) -> None:
    # VMs restarted again and again: every boot is a new series that sends a few batches and
    # then never again
    rng = random.Random(41)
    clock = Clock()
    agg = Aggregator(storage, directory(TERMS), series_idle_s=IDLE, monotonic=clock)
    start = (time.time_ns() // HOUR - 1) * HOUR
    per_round, rounds = 30, 8
    for r in range(rounds):
        series = [
            make_series(rng, "cust_a", f"vm_{v}", f"i{r}", start + r * 10**11, 40)
            for v in range(per_round)
        ]
        for part in range(2):  # two batches per boot, one minute apart
            msgs = [encode(b) for s in series for b in to_batches(s, 20)[part : part + 1]]
            out = agg.process([Incoming(i, m) for i, m in enumerate(msgs)])
            assert len(out.ack) == per_round and out.held == 0
            clock.now += 60.0
        clock.now += IDLE  # the boot's VMs restart (a new instance each)
        # in memory: this round's series, and the previous round's (touched by the flush before
        # the last one, so not yet swept); never all the series seen so far
        kept = {sid.split(":")[1] for sid in agg._states}
        assert kept == {f"i{r}", f"i{max(r - 1, 0)}"}, (r, kept)
        assert agg.series_in_memory <= 2 * per_round
    n_stored = storage.query("SELECT count() AS n FROM billing_series_state FINAL")[0]["n"]
    assert int(n_stored) == per_round * rounds  # all are in storage
    # an evicted series is known to have a stored state: it is read back, not taken as new
    assert agg._stored is not None
    assert hash("vm_0:i0") in agg._stored and "vm_0:i0" not in agg._states


def test_the_set_of_stored_series_is_exact_across_merges() -> None:
    # what the aggregator asks it: is this series (by hash) known to have a stored state not
    # retired by now? (each with when its state is retired, in s)
    rng = random.Random(43)
    ids = [f"vm_{i}:i{rng.randrange(10**6)}" for i in range(20_000)]
    first, later, never = ids[:6000], ids[6000:15000], ids[15000:]
    exp = {hash(x): rng.randrange(100, 200) for x in ids}
    got = SeriesHashes((hash(x), exp[hash(x)]) for x in first)
    want = {hash(x) for x in first}
    for x in later:  # evicted series, one by one: several merges into the sorted part
        got.add(hash(x), exp[hash(x)])
        want.add(hash(x))
    extremes = [-(2**63), 2**63 - 1, 0]
    got.add(extremes[0], 150)
    want.add(extremes[0])
    exp[extremes[0]] = 150
    probe = [hash(x) for x in ids] + extremes
    assert got.contains(probe) == [h in want for h in probe]
    assert got.contains(probe, 150) == [h in want and exp[h] >= 150 for h in probe]
    assert len(got) == len(want) and sum(got.contains([hash(x) for x in never])) == 0
    assert hash(later[-1]) in got and hash(never[0]) not in got and "x" not in got
    assert SeriesHashes().contains([1, 2]) == [False, False]
    # a series written again keeps its latest expiry, wherever its entries are
    h0 = hash(first[0])
    got.add(h0, 10**6)
    got.add(h0, 5)
    assert got.contains([h0], 10**6) == [True]
    # retired states are forgotten: only those not retired by then stay
    assert got.prune(150) >= sum(1 for h in want if exp[h] < 150 and h != h0)
    assert len(got) == sum(1 for h in want if exp[h] >= 150 or h == h0)
    assert got.contains(probe) == [h in want and (exp[h] >= 150 or h == h0) for h in probe]


def test_series_idle_s_must_be_positive(storage: ChdbStorage) -> None:
    with pytest.raises(InvalidInput, match="series_idle_s"):
        Aggregator(storage, directory(TERMS), series_idle_s=0)


def _series(start: int) -> list[Series]:
    rng = random.Random(42)
    return [
        # crosses the hour after its batch 3; gaps and invalid samples (the state's last valid
        # sample and its running hour total matter across the eviction)
        make_series(rng, "cust_a", "vm_1", "i1", start, 2400, gap_every=450, invalid_every=211),
        make_series(rng, "cust_a", "vm_2", "i1", start + 10**9, 2400, vcpus=1, invalid_every=173),
        # a batch that never comes in time: skipped, then late, after the series was evicted
        make_series(rng, "cust_b", "vm_3", "i1", start - 10**10, 2100, vcpus=4),
    ]


# (batches to deliver as (series index, seq), then seconds the clock moves on)
PLAN: list[tuple[list[tuple[int, int]], float]] = [
    ([(0, 0), (1, 0), (2, 0), (2, 1)], 30.0),
    ([(0, 1), (2, 3), (2, 4)], HOLD + 1),  # vm_3 holds 3 and 4, waiting for 2
    ([], IDLE + 1),  # ...then applies them without it (skipped, checkpoint)
    ([(1, 1)], IDLE + 1),  # vm_1 evicted here
    ([(1, 2)], 30.0),  # vm_3 evicted here (the flush before touched it)
    ([(0, 1), (0, 2), (0, 3), (2, 2)], 30.0),  # a duplicate, the next ones, the late one
    ([(0, 4), (1, 3), (2, 5)], IDLE + 1),
    ([(1, 4)], IDLE + 1),  # the flush before touched all three: none evicted
    ([(1, 5)], 30.0),  # vm_1 and vm_3 evicted again
    ([(0, 5), (0, 6), (0, 7), (2, 4), (2, 6)], 30.0),  # (2, 4): a duplicate
    ([(1, 6), (1, 7)], 30.0),
]
# series in memory after each step, with eviction
IN_MEMORY = [3, 3, 3, 2, 1, 3, 3, 3, 1, 3, 3]


def _run(path: Path, series: list[Series], idle_s: float) -> tuple[dict[str, Any], list[int]]:
    """Deliver PLAN to a fresh store; return every billing table's rows (without the columns
    that say when a row was written) and the number of series in memory after each step."""
    batches = [[encode(b) for b in to_batches(s, 300)] for s in series]
    storage = ChdbStorage(path)
    try:
        storage.migrate()
        clock = Clock()
        agg = Aggregator(
            storage,
            directory(TERMS),
            hold_timeout_s=HOLD,
            series_idle_s=idle_s,
            monotonic=clock,
            wall_ns=lambda: 1_800_000_000 * 10**9,  # the checkpoints' time, alike in both runs
        )
        in_memory = []
        for n, (deliver, wait) in enumerate(PLAN):
            out = agg.process([Incoming((n, j, q), batches[j][q]) for j, q in deliver])
            # step 1 holds two batches of vm_3, applied in step 2
            assert len(out.ack) == {1: 1, 2: 2}.get(n, len(deliver)), n
            assert out.term == []
            in_memory.append(agg.series_in_memory)
            clock.now += wait
        assert agg.held_handles() == []
        assert_bills_match(storage, raw_of(series), TERMS)
        assert_hours_match(storage, series)
        tables = {
            name: [tuple(r.values()) for r in storage.query(sql)]
            for name, sql in {
                "billing_hourly": "SELECT * EXCEPT (version, updated_at) FROM billing_hourly "
                "FINAL ORDER BY ALL",
                "metrics_raw": "SELECT * FROM metrics_raw ORDER BY ALL",
                "metrics_quarantine": "SELECT * EXCEPT (received_at) FROM metrics_quarantine "
                "ORDER BY ALL",
                "billing_series_state": "SELECT * EXCEPT (version) FROM billing_series_state "
                "FINAL ORDER BY ALL",
                "processed_batches": "SELECT * EXCEPT (processed_at) FROM processed_batches "
                "FINAL ORDER BY ALL",
            }.items()
        }
        return tables, in_memory
    finally:
        storage.close()


def test_an_evicted_series_is_billed_exactly_as_without_eviction(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="unkey_deploy.billing.aggregator")
    # two minutes before an hour boundary, recent (inside the raw rows' TTL)
    series = _series((time.time_ns() // HOUR) * HOUR - 120 * 10**9)
    kept, kept_mem = _run(tmp_path / "kept", series, idle_s=1e9)
    evicted, evicted_mem = _run(tmp_path / "evicted", series, idle_s=IDLE)
    assert kept_mem[-1] == 3
    # the states really left memory (each step's count, see PLAN)
    assert evicted_mem == IN_MEMORY
    assert sum("evicted" in r.getMessage() for r in caplog.records) >= 3
    assert any("applied by a replay" in r.getMessage() for r in caplog.records)
    for name, rows in kept.items():
        assert evicted[name] == rows, name  # the same rows: no duplicate, no gap
    assert len(kept["billing_hourly"]) >= 4 and len(kept["metrics_quarantine"]) >= 10
