"""Retention of the aggregator's per-series state (aggregator module docstring, "Memory"): a
series silent for ``series_retention_s`` leaves memory, the start-up read and the usage store;
a batch of it that comes after that (a redelivered duplicate, a late skipped batch, the series
sending again) is quarantined as ``series_retired`` and bills nothing; and the bills of every
series are those of the reference, with or without retention sweeps."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pydantic
import pytest

from unkey_deploy.billing.aggregator import (
    LATE_HORIZON_S,
    REASON_RETIRED,
    REASON_TOO_LATE,
    SERIES_RETENTION_S,
    Aggregator,
    Incoming,
)
from unkey_deploy.clickhouse.chdb_backend import ChdbStorage
from unkey_deploy.core.config import BillingConfig
from unkey_deploy.core.errors import InvalidInput
from unkey_deploy.metering.model import Sample

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

DAY_S = 86_400
DAY = DAY_S * 10**9
IDLE = 300.0
RETENTION_S = 8.0 * DAY_S  # the shortest the settings allow is just over the 7-day horizon
NOW_HOUR = (time.time_ns() // HOUR) * HOUR
# ClickHouse's TTL deletes go by the real clock, at merges that may come at any time. Series
# of PAST (nine days ago) retire before today in real time: an OPTIMIZE drops their rows. Series
# of FUTURE never do during a test; there ``_merge`` does what a merge would by the test's wall
# clock, so each test knows whether the row is there.
PAST = NOW_HOUR - 9 * DAY
FUTURE = NOW_HOUR + 30 * DAY


class Wall:
    """The wall clock (ns) the test moves."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def _agg(storage: ChdbStorage, clock: Clock, wall: Wall, **kw: Any) -> Aggregator:
    opts: dict[str, Any] = {"series_retention_s": RETENTION_S, **kw}
    return Aggregator(
        storage,
        directory(TERMS),
        hold_timeout_s=HOLD,
        series_idle_s=IDLE,
        monotonic=clock,
        wall_ns=wall,
        **opts,
    )


def _sweep(agg: Aggregator, clock: Clock) -> None:
    """Let the idle/retention sweep run (it skips series touched by the flush before)."""
    for _ in range(2):
        clock.now += IDLE + 1
        agg.process([])


def _merge(storage: ChdbStorage, wall_ns: int) -> None:
    """What the TTL does at a merge at ``wall_ns``: drop the rows retired by then."""
    storage.command(
        "ALTER TABLE billing_series_state DELETE WHERE toUnixTimestamp(expires_at) < "
        f"{wall_ns // 10**9} SETTINGS mutations_sync = 2"
    )


def _state_rows(storage: ChdbStorage, vm_id: str) -> int:
    rows = storage.query(
        "SELECT count() AS n FROM billing_series_state FINAL WHERE vm_id = {v:String}", {"v": vm_id}
    )
    return int(rows[0]["n"])


def _quarantined(storage: ChdbStorage) -> dict[str, set[str]]:
    """Quarantined batch id -> reasons."""
    out: dict[str, set[str]] = {}
    for r in storage.query("SELECT batch_id, reason FROM metrics_quarantine"):
        out.setdefault(str(r["batch_id"]), set()).add(str(r["reason"]))
    return out


def _continued(s: Series, start_ns: int, n: int) -> list[Sample]:
    """``n`` more samples of ``s`` from ``start_ns`` on (the VM ran unmetered in between: its
    counters went on)."""
    last = s.samples[-1]
    return [
        Sample(
            start_ns + i * 10**8,
            last.cpu_time_ns + 10**9 + i * 5 * 10**7,
            last.memory_used_bytes,
            last.net_rx_bytes + 10**6 + i * 1000,
            last.net_tx_bytes + i * 100,
            last.disk_read_bytes,
            last.disk_write_bytes,
        )
        for i in range(1, n + 1)
    ]


def test_retention_must_exceed_the_late_horizon(storage: ChdbStorage) -> None:
    assert SERIES_RETENTION_S == 14 * DAY_S == BillingConfig().series_retention_s
    assert BillingConfig.LATE_HORIZON_S == LATE_HORIZON_S == 7 * DAY_S
    with pytest.raises(pydantic.ValidationError, match="series_retention_s"):
        BillingConfig(series_retention_s=7 * DAY_S)
    with pytest.raises(InvalidInput, match="series_retention_s"):
        Aggregator(storage, directory(TERMS), series_retention_s=LATE_HORIZON_S)
    assert BillingConfig(series_retention_s=RETENTION_S).series_retention_s == RETENTION_S


def test_a_retired_series_leaves_memory_the_start_up_read_and_storage(
    storage: ChdbStorage,
) -> None:
    rng = random.Random(51)
    t0 = PAST
    old = make_series(rng, "cust_a", "vm_old", "i1", t0, 900)
    new = make_series(rng, "cust_b", "vm_new", "i1", t0 + 2 * DAY, 900)
    clock, wall = Clock(), Wall(t0 + 2 * 60 * 10**9)
    agg = _agg(storage, clock, wall)
    assert len(agg.process([Incoming(b.seq, encode(b)) for b in to_batches(old, 300)]).ack) == 3
    clock.now += 60
    wall.ns = t0 + 2 * DAY + 2 * 60 * 10**9
    assert len(agg.process([Incoming(b.seq, encode(b)) for b in to_batches(new, 300)]).ack) == 3
    _sweep(agg, clock)  # both idle: out of memory, known as stored
    stored = agg._stored_series()
    assert agg.series_in_memory == 0
    assert stored.contains([hash("vm_old:i1"), hash("vm_new:i1")]) == [True, True]

    wall.ns = t0 + 9 * DAY  # vm_old's last sample and batch were 9 days ago, vm_new's 7
    _sweep(agg, clock)
    assert stored.contains([hash("vm_old:i1"), hash("vm_new:i1")]) == [False, True]
    assert len(stored) == 1
    # a restart reads only the series not retired
    again = _agg(storage, Clock(), wall)
    fresh = again._stored_series()
    assert len(fresh) == 1 and hash("vm_new:i1") in fresh and hash("vm_old:i1") not in fresh

    # storage: the TTL drops the retired row at a merge (vm_new's expires in the real future)
    storage.command("OPTIMIZE TABLE billing_series_state FINAL")
    assert _state_rows(storage, "vm_old") == 0 and _state_rows(storage, "vm_new") == 1
    # the bills did not change
    assert_bills_match(storage, raw_of([old, new]), TERMS)
    assert_hours_match(storage, [old, new])


@pytest.mark.parametrize("merged", [False, True], ids=["row-still-stored", "row-dropped"])
def test_a_duplicate_or_late_batch_of_a_retired_series_bills_nothing(
    storage: ChdbStorage, merged: bool
) -> None:
    rng = random.Random(52)
    t0 = FUTURE
    s = make_series(rng, "cust_a", "vm_r", "i1", t0, 1200, gap_every=300)
    b = [encode(x) for x in to_batches(s, 300)]
    clock, wall = Clock(), Wall(t0 + 3 * 60 * 10**9)
    agg = _agg(storage, clock, wall)
    # batch 1 is lost: 2 and 3 are held, then applied without it (skipped, checkpoint)
    assert agg.process([Incoming(0, b[0]), Incoming(2, b[2]), Incoming(3, b[3])]).held == 2
    clock.now += HOLD + 1
    assert sorted(agg.process([]).ack) == [2, 3]
    applied = Series(s.key, [*s.samples[:300], *s.samples[600:]])
    assert_hours_match(storage, [applied])
    before = hourly(storage)

    wall.ns = t0 + 9 * DAY  # past the late horizon and the retention
    _sweep(agg, clock)
    assert agg.series_in_memory == 0
    if merged:
        _merge(storage, wall.ns)
    assert _state_rows(storage, "vm_r") == (0 if merged else 1)
    # a redelivered batch 0 and the late batch 1, after a restart too
    for n, a in enumerate([agg, _agg(storage, Clock(), wall)]):
        out = a.process([Incoming(("dup", n), b[0]), Incoming(("late", n), b[1])])
        assert sorted(out.ack) == [("dup", n), ("late", n)] and out.term == [] and out.held == 0
    assert hourly(storage) == before  # no billing row changed
    q = _quarantined(storage)
    if merged:  # nothing can place them: quarantined with the reason, never billed
        assert q == {"vm_r:i1:0": {REASON_RETIRED}, "vm_r:i1:1": {REASON_RETIRED}}
    else:  # the state is still there: a duplicate (skipped), and a batch past the horizon
        assert q == {"vm_r:i1:1": {REASON_TOO_LATE}}
    assert_bills_match(storage, raw_of([applied]), TERMS)


@pytest.mark.parametrize("merged", [False, True], ids=["row-still-stored", "row-dropped"])
def test_a_retired_series_that_sends_again_is_not_taken_for_a_new_one(
    storage: ChdbStorage, merged: bool
) -> None:
    # the VM ran on unmetered for 9 days (its host's metering was down), then its series goes
    # on: batch 4, with recent samples and counters that hold the 9 days. Taken for a new
    # series (seq 0 never comes), its counters would be billed from boot: twice.
    rng = random.Random(53)
    t0 = FUTURE
    s = make_series(rng, "cust_b", "vm_c", "i1", t0, 1200)
    clock, wall = Clock(), Wall(t0 + 3 * 60 * 10**9)
    agg = _agg(storage, clock, wall)
    agg.process([Incoming(q, encode(x)) for q, x in enumerate(to_batches(s, 300))])
    before = hourly(storage)
    wall.ns = t0 + 9 * DAY
    _sweep(agg, clock)
    if merged:
        _merge(storage, wall.ns)
    assert _state_rows(storage, "vm_c") == (0 if merged else 1)
    more = Series(s.key, [*s.samples, *_continued(s, wall.ns - 60 * 10**9, 300)])
    nxt = to_batches(more, 300)[4]
    assert nxt.seq == 4 and nxt.samples[0].t > wall.ns - 2 * 60 * 10**9
    out = agg.process([Incoming("next", encode(nxt))])
    # not known in memory any more: waits for seq 0 to 3, as a new series would
    assert out.ack == [] and out.held == 1
    clock.now += HOLD + 1
    out = agg.process([])
    assert out.ack == ["next"] and out.held == 0
    if not merged:  # its state is read back: placed exactly
        assert_hours_match(storage, [more])
        assert_bills_match(storage, raw_of([more]), TERMS)
        assert _quarantined(storage) == {}
        return
    assert _quarantined(storage) == {"vm_c:i1:4": {REASON_RETIRED}}
    assert hourly(storage) == before
    assert_bills_match(storage, raw_of([s]), TERMS)


def _run(path: Path, retention_s: float) -> tuple[list[tuple[Any, ...]], dict[str, set[str]], int]:
    """VMs booting over 16 days, each boot a series of 3 batches, every batch also redelivered a
    day later and the first one 9 days later; returns billing_hourly (without when rows were
    written), the quarantine and the series in memory at the end."""
    rng = random.Random(54)
    storage = ChdbStorage(path)
    try:
        storage.migrate()
        clock, wall = Clock(), Wall(FUTURE)
        agg = _agg(storage, clock, wall, series_retention_s=retention_s)
        series: list[Series] = []
        sent: dict[int, list[bytes]] = {}  # day -> batches sent that day
        for day in range(17):
            start = FUTURE + day * DAY
            boots = [
                make_series(rng, c, f"vm_{c[-1]}{v}", f"i{day}", start + v * 10**10, 900)
                for c in ("cust_a", "cust_b")
                for v in range(2)
            ]
            series += boots
            sent[day] = [encode(b) for s in boots for b in to_batches(s, 300)]
            again = [*sent.get(day - 1, []), *sent.get(day - 9, [])[:4]]
            wall.ns = start + 5 * 60 * 10**9
            _merge(storage, wall.ns)  # as if merges ran every day
            out = agg.process([Incoming(i, m) for i, m in enumerate([*sent[day], *again])])
            assert len(out.ack) == len(sent[day]) + len(again) and out.held == 0
            _sweep(agg, clock)
        assert_bills_match(storage, raw_of(series), TERMS)
        assert_hours_match(storage, series)
        rows = storage.query(
            "SELECT * EXCEPT (version, updated_at) FROM billing_hourly FINAL ORDER BY ALL"
        )
        return [tuple(r.values()) for r in rows], _quarantined(storage), agg.series_in_memory
    finally:
        storage.close()


def test_bills_are_the_same_with_and_without_retention(tmp_path: Path) -> None:
    kept, kept_q, _ = _run(tmp_path / "kept", retention_s=10**9)
    retired, retired_q, in_memory = _run(tmp_path / "retired", retention_s=RETENTION_S)
    assert retired == kept  # the same rows: no series billed twice, none lost
    assert kept_q == {}  # redeliveries were duplicates
    # with retention, the redeliveries 9 days later found their series retired
    assert retired_q and all(r == {REASON_RETIRED} for r in retired_q.values())
    assert {bid.split(":")[1] for bid in retired_q} == {f"i{d}" for d in range(17 - 9)}
    assert in_memory <= 4


def test_old_usage_of_a_series_never_billed_is_billed(storage: ChdbStorage) -> None:
    # a backfill (unkey usage import) of usage older than the retention: nothing was billed for
    # these series, so they are new, not retired
    rng = random.Random(55)
    s = make_series(rng, "cust_a", "vm_b", "i1", PAST - 30 * DAY, 1200)
    late = make_series(rng, "cust_b", "vm_l", "i1", PAST - 30 * DAY, 1200)
    clock, wall = Clock(), Wall(time.time_ns())
    agg = _agg(storage, clock, wall)
    lb = to_batches(late, 300)
    out = agg.process(
        [Incoming(q, encode(x)) for q, x in enumerate(to_batches(s, 300))]
        + [Incoming(("l", x.seq), encode(x)) for x in lb[1:]]
    )
    assert len(out.ack) == 4 and out.held == 3  # vm_l waits for its seq 0
    clock.now += HOLD + 1
    assert len(agg.process([]).ack) == 3  # ...then is applied without it
    assert agg.process([Incoming("l0", encode(lb[0]))]).ack == ["l0"]  # replayed in its place
    assert _quarantined(storage) == {}
    assert_hours_match(storage, [s, late])
    assert_bills_match(storage, raw_of([s, late]), TERMS)


def test_a_series_waiting_for_a_late_batch_keeps_its_state_until_the_horizon(
    storage: ChdbStorage,
) -> None:
    rng = random.Random(56)
    t0 = FUTURE
    s = make_series(rng, "cust_a", "vm_w", "i1", t0, 1200, gap_every=200)
    b = [encode(x) for x in to_batches(s, 300)]
    clock, wall = Clock(), Wall(t0 + 3 * 60 * 10**9)
    agg = _agg(storage, clock, wall)
    agg.process([Incoming(0, b[0]), Incoming(2, b[2]), Incoming(3, b[3])])
    clock.now += HOLD + 1
    assert sorted(agg.process([]).ack) == [2, 3]  # batch 1 skipped
    wall.ns += int(6.9 * DAY)  # inside the late horizon, the series silent since
    _sweep(agg, clock)
    _merge(storage, wall.ns)
    again = _agg(storage, Clock(), wall)  # a restart too
    assert again.process([Incoming("late", b[1])]).ack == ["late"]
    assert _quarantined(storage) == {}  # applied by a replay, in its place
    assert_hours_match(storage, [s])
    assert_bills_match(storage, raw_of([s]), TERMS)


def test_a_state_never_expires_earlier_than_before(storage: ChdbStorage) -> None:
    # a host whose clock is 20 days ahead sends batch 0, then its clock is set right: the
    # state's expiry stays where batch 0 put it (every stored version), else a merge could drop
    # the newest version first and FINAL would read the older one back
    rng = random.Random(57)
    s = make_series(rng, "cust_b", "vm_f", "i1", FUTURE + 20 * DAY, 300)
    fixed = _continued(s, FUTURE + 60 * 10**9, 300)  # ... counters go on, time set back
    clock, wall = Clock(), Wall(FUTURE)
    agg = _agg(storage, clock, wall)
    agg.process([Incoming(0, encode(to_batches(s, 300)[0]))])
    clock.now += 1
    wall.ns += 2 * 60 * 10**9
    agg.process([Incoming(1, encode(to_batches(Series(s.key, [*s.samples, *fixed]), 300)[1]))])
    rows = storage.query(
        "SELECT toInt64(toUnixTimestamp(expires_at)) AS e FROM billing_series_state "
        "WHERE vm_id = 'vm_f' ORDER BY version"
    )
    want = (s.samples[-1].t // 10**9) + int(RETENTION_S)
    assert [int(r["e"]) for r in rows] == [want, want]
