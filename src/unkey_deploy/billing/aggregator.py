"""The billing aggregator: metering batches in, exact VM-hour billing rows, raw intervals and
quarantined samples out (stage 7 of the design; what a bill means is BILLING.md).

Order and exactly-once
----------------------
A series (one VM instance) sends batches with ``seq`` = 0, 1, 2, ... (metering.model.Batch).
The aggregator applies each series' batches **in seq order**, whatever order they arrive in:
a batch ahead of a missing one is held (unacked) until the missing one is redelivered, so a late
batch is simply applied in its place and every hour it touches is recomputed from the series'
state at that point. Because samples of a series are ordered by t within and across batches,
this is exactly BILLING.md's "ordered by t" cleaning, and replaying the same batches in any
order, any number of times, gives the same rows.

Per series the aggregator keeps a small state (last applied seq, last valid sample, usage so far
in the current hour) in ClickHouse (``billing_series_state``, ReplacingMergeTree read with
FINAL). A flush of many batches commits in this order, then acks:

1. raw interval rows (``metrics_raw``; rows of redelivered batches already present are not sent
   again) and quarantined samples;
2. ``billing_hourly`` rows of every hour touched (state's running total + the new usage), with a
   version larger than any before (a recomputed hour replaces the older row);
3. the new series states: **the commit point**. A batch with ``seq <= last_seq`` is a duplicate;
4. ``processed_batches`` markers (for operators/queries), then the JetStream acks.

A crash before 3 leaves the old states: redelivered batches are applied again to the same state
and give the same rows (billing rows win by version, raw rows are not sent twice). A crash after
3 makes the redeliveries duplicates, acked and skipped.

Missing and late batches
------------------------
A batch held longer than ``hold_timeout_s`` (its predecessor never came), or at once when the
missing ones all came broken (undecodable, header readable: quarantined), is applied without the
missing ones: their seqs go into the state's ``skipped`` set, and the state just before the first
of them is kept as the series' **checkpoint**. From then on every batch applied to the series is
also stored as received (``billing_replay_batches``, only for such series). When a skipped batch
arrives after all, the series is **replayed** from the checkpoint with it in its place: every
hour from the checkpoint on is recomputed and written with a newer version (an hour that no
longer has usage gets a zero row), exactly the rows in-order delivery would have given; samples
that the late batch makes invalid are quarantined. The replay without the late batch must give
the stored state back, else the late batch is quarantined (``replay_incomplete``) and nothing
changes. After ``late_horizon_s`` (7 days, below the replay table's 8-day TTL) the checkpoint is
dropped and a skipped batch that still comes is quarantined (``arrived_after_horizon``).
``metrics_raw`` (dashboards) is append-only and is not rewritten: the interval that closed the
hole already holds the hole's counters, so the late batch adds no raw rows there.
The commit order above holds (replay batches are written before the states).

Memory
------
Every VM boot is a new series, so the in-memory states would grow forever. A series with no
batch received or held for ``series_idle_s`` loses its in-memory state (checked every quarter
of that): its state is in storage, and its next batch (a late one too) reads it back, exactly as
after a restart. Its id goes into the set of series known to have a stored state, so it is read
back rather than taken for a new series. A series touched by the previous flush is kept whatever
its age: that flush's commit (which writes the state) may still be running.

Retention: a series' state is **retired** ``series_retention_s`` (R, default 14 days: the
7-day late horizon plus as much again; it must exceed the horizon) after both its newest sample
and the last flush that wrote it (``expires_at``, written with every state and never moved
earlier). Then it leaves the set of stored series (memory: only series active within R), the
start-up read skips it, and ClickHouse drops its rows (TTL ``expires_at``, at merges). A retired
series can no longer be placed exactly, so none of its batches may be taken for a new series
(a redelivered seq 0 would be billed again, a later seq's counters from boot too). A series
without a known state is **checked** when it holds a batch with samples older than R (every
batch of a retired series up to its last applied one is that old: its newest sample is) or when
its seq 0 did not come within the hold timeout (a retired series that sends again after R):

1. its state still in storage (a merge has not dropped it yet) is read and used: exact;
2. else, if ``billing_hourly`` (kept for ever: it is the bill) has a row of it, it was billed
   and retired: every batch of it is quarantined (``series_retired``), acked, never billed;
3. else it is new (e.g. a backfill of old usage never billed) and billed as such.

So whether a batch is placed from a retired state still in storage or quarantined depends on
when a merge drops the row, and both are correct: nothing is billed twice and nothing is lost
(a quarantined batch is kept with its samples). A series seen only in quarantine (unknown
customer, ...) has no billing row: its batches are cleaned again and quarantined again. A new
series whose first batch is seq 0 with recent samples costs no query. A series waiting for a
late batch keeps its state: the skip's flush set ``expires_at`` R > ``late_horizon_s`` ahead.

Hot path: one ``clean`` (numpy) per series per flush and Arrow columns built with numpy; no
per-sample Python.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from ..clickhouse.api import BillingHourlyRow, Storage
from ..core.config import BillingConfig
from ..core.errors import InvalidInput
from ..metering.codec import COLUMNS, DecodedBatch, Samples, decode_array, read_key
from ..metering.model import SeriesKey
from . import pricing
from .customers import CustomerDirectory, CustomerInfo
from .pricing import NS_PER_HOUR
from .usage import FIELDS, HourUsage, Many, clean, clean_many

log = logging.getLogger(__name__)

# created by clickhouse/migrations/005_billing_state.sql
STATE_TABLE = "billing_series_state"
REPLAY_TABLE = "billing_replay_batches"
_SAMPLE_COLS = ("t", *COLUMNS[1:])
_ACC = tuple(f"acc_{f}" for f in FIELDS)

REASON_UNKNOWN_CUSTOMER = "unknown_customer"
REASON_UNKNOWN_VM = "unknown_vm"
REASON_INVALID_BATCH = "invalid_batch"
REASON_TOO_LATE = "arrived_after_horizon"
REASON_REPLAY = "replay_incomplete"
REASON_RETIRED = "series_retired"
REASON_SEQ_RANGE = "seq_out_of_range"
# How far ahead of its series' next seq a batch may be: ~69 days of 60 s batches, far more than
# the late horizon. A seq further ahead (the header's seq is any u64) is no gap that batches
# could fill but a corrupt or hostile header: quarantined at once, never held or skipped over
# (the seqs in between would be held in memory and in the series' state).
MAX_SEQ_AHEAD = 100_000
LATE_HORIZON_S = BillingConfig.LATE_HORIZON_S
# A series' state is retired this long after its newest sample and its last batch (module
# docstring, "Memory"); billing.series_retention_s.
SERIES_RETENTION_S: float = BillingConfig.model_fields["series_retention_s"].default
_STATE_COLS = (
    "vm_id",
    "instance_id",
    "customer_id",
    "vcpus",
    "memory_total_bytes",
    "last_seq",
    "has_last",
    *_SAMPLE_COLS,
    "hour",
    *_ACC,
    "skipped",
    "checkpoint",
)
REASON_ALLOCATION = "allocation_changed"
# A series' in-memory state is dropped after this long without a batch (it stays in storage).
SERIES_IDLE_S = 300.0


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message from the bus. ``handle`` is given back in :class:`Settled`. ``stream_seq``:
    the bus's id of the stored message (JetStream's stream sequence), the same in every
    delivery of it; None when unknown."""

    handle: Any
    data: bytes
    redelivered: bool = False
    stream_seq: int | None = None


@dataclass
class Settled:
    """What to do with the messages of a flush, once :meth:`Aggregator.process` returned."""

    ack: list[Any] = field(default_factory=list)
    term: list[Any] = field(default_factory=list)
    held: int = 0
    samples: int = 0
    raw_rows: int = 0
    billing_rows: int = 0


@dataclass
class Prepared:
    """A computed flush, not yet written (see :meth:`Aggregator.commit`)."""

    out: Settled
    raw: pa.Table | None = None
    raw_ids: list[str] = field(default_factory=list)
    redelivered: set[str] = field(default_factory=set)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    billing: list[BillingHourlyRow] = field(default_factory=list)
    state_sql: str | None = None
    done_ids: list[str] = field(default_factory=list)
    replay: list[tuple[SeriesKey, int, bytes]] = field(default_factory=list)


@dataclass
class Checkpoint:
    """A series' state just after batch ``last_seq`` (the one before its first skipped batch);
    ``since_ns``: wall time of the skip (for ``late_horizon_s``)."""

    last_seq: int
    last: np.ndarray | None
    hour: int
    acc: HourUsage
    since_ns: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "last_seq": self.last_seq,
                "last": None if self.last is None else [int(x) for x in self.last],
                "hour": self.hour,
                "acc": {f: getattr(self.acc, f) for f in FIELDS},
                "since_ns": self.since_ns,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        d = json.loads(text)
        last = None if d["last"] is None else np.array(d["last"], dtype=np.int64)
        acc = HourUsage(**{f: int(d["acc"][f]) for f in FIELDS})
        return cls(int(d["last_seq"]), last, int(d["hour"]), acc, int(d["since_ns"]))


@dataclass
class SeriesState:
    key: SeriesKey
    last_seq: int = -1
    last: np.ndarray | None = None
    hour: int = -1
    acc: HourUsage = field(default_factory=HourUsage)
    skipped: set[int] = field(default_factory=set)  # seqs applied around, not yet arrived
    checkpoint: Checkpoint | None = None
    # when the stored state is retired (unix s; never decreases); 0: nothing stored yet
    expires_s: int = 0
    # in memory only (for eviction): when a batch of the series was last received or held
    # (monotonic s), and in which prepare()
    seen: float = 0.0
    prepared_in: int = 0
    # in memory only, for a series without a state (last_seq < 0): ``checked``: storage says it
    # is new; ``retired``: it was billed and its state retired, so its batches are quarantined
    checked: bool = False
    retired: bool = False

    def snapshot(self, since_ns: int) -> Checkpoint:
        return Checkpoint(self.last_seq, self.last, self.hour, self.acc.copy(), since_ns)

    def same_usage(self, o: SeriesState) -> bool:
        if (self.last is None) != (o.last is None):
            return False
        if self.last is not None and o.last is not None and not np.array_equal(self.last, o.last):
            return False
        return (self.hour, self.acc) == (o.hour, o.acc)


@dataclass
class _Held:
    item: Incoming
    batch: DecodedBatch
    since: float


class SeriesHashes:
    """The ``hash()`` of every series id with a state in storage, each with when that state is
    retired (unix s): compact, and bounded by the retention (``prune`` drops the retired ones).
    Sorted int64 arrays take 16 bytes a series (a Python dict ~100 more); additions gather in a
    small dict, merged in when it grows."""

    MERGE_AT = 4096

    def __init__(self, items: Iterable[tuple[int, int]] = ()) -> None:
        flat = np.fromiter((x for pair in items for x in pair), dtype=np.int64)
        pairs = flat.reshape(-1, 2)
        self._h, self._exp = self._latest(pairs[:, 0], pairs[:, 1])
        self._recent: dict[int, int] = {}

    @staticmethod
    def _latest(h: np.ndarray, exp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted by hash, one entry per hash with its latest expiry."""
        order = np.lexsort((exp, h))
        h, exp = h[order], exp[order]
        last = np.ones(len(h), dtype=bool)
        last[:-1] = h[1:] != h[:-1]
        return h[last], exp[last]

    def _merge(self) -> None:
        if self._recent:
            new = np.fromiter(self._recent.items(), dtype=np.dtype((np.int64, 2)))
            self._h, self._exp = self._latest(
                np.concatenate([self._h, new[:, 0]]), np.concatenate([self._exp, new[:, 1]])
            )
            self._recent.clear()

    def __len__(self) -> int:
        self._merge()
        return len(self._h)

    def add(self, h: int, expires_s: int) -> None:
        self._recent[h] = max(expires_s, self._recent.get(h, expires_s))
        if len(self._recent) >= max(self.MERGE_AT, len(self._h) // 8):  # amortised
            self._merge()

    def contains(self, hashes: Sequence[int], now_s: int | None = None) -> list[bool]:
        """Membership of each of ``hashes`` (with ``now_s``: only states not retired by then)."""
        if not hashes:
            return []
        floor = -(2**63) if now_s is None else now_s
        q = np.asarray(hashes, dtype=np.int64)
        if len(self._h):
            i = np.minimum(np.searchsorted(self._h, q), len(self._h) - 1)
            found = (self._h[i] == q) & (self._exp[i] >= floor)
        else:
            found = np.zeros(len(q), dtype=bool)
        return [
            bool(f) or self._recent.get(h, floor - 1) >= floor
            for f, h in zip(found.tolist(), hashes, strict=True)
        ]

    def __contains__(self, h: object) -> bool:
        return isinstance(h, int) and self.contains([h])[0]

    def prune(self, now_s: int) -> int:
        """Forget the states retired before ``now_s`` (a pass over the array, no sort); returns
        how many entries went."""
        keep = self._exp >= now_s
        gone = len(keep) - int(keep.sum())
        if gone:
            self._h, self._exp = self._h[keep], self._exp[keep]
        stale = [h for h, e in self._recent.items() if e < now_s]
        for h in stale:
            del self._recent[h]
        return gone + len(stale)


def _sid(vm_id: str, instance_id: str) -> str:
    return f"{vm_id}:{instance_id}"


def _esc(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Versioner:
    """Strictly increasing versions from the wall clock (ns), across restarts too: the
    aggregator first moves it past the largest version already stored (:meth:`advance_past`),
    so a clock stepped back across a restart cannot make newer rows lose to older ones."""

    def __init__(self, now_ns: Any = time.time_ns) -> None:
        self._now = now_ns
        self._last = 0

    def advance_past(self, version: int) -> None:
        """Every later :meth:`next` is larger than ``version``."""
        self._last = max(self._last, version)

    def next(self) -> int:
        v = max(int(self._now()), self._last + 1)
        self._last = v
        return v


class Aggregator:
    """Synchronous core (the bus loop is :func:`run_consumer`). Not thread-safe."""

    def __init__(
        self,
        storage: Storage,
        directory: CustomerDirectory,
        *,
        pricing_version: str = "v1",
        hold_timeout_s: float = 120.0,
        late_horizon_s: float = LATE_HORIZON_S,
        series_idle_s: float = SERIES_IDLE_S,
        series_retention_s: float = SERIES_RETENTION_S,
        monotonic: Any = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
        versioner: Versioner | None = None,
    ) -> None:
        pricing.price_sheet(pricing_version, "standard")  # fail fast on an unknown version
        if not series_idle_s > 0:
            raise InvalidInput(f"series_idle_s must be > 0, not {series_idle_s}")
        if not series_retention_s > late_horizon_s:
            raise InvalidInput(
                f"series_retention_s ({series_retention_s}) must exceed late_horizon_s "
                f"({late_horizon_s}): a series waiting for a late batch keeps its state"
            )
        self.storage = storage
        self.directory = directory
        self.pricing_version = pricing_version
        self.hold_timeout_s = hold_timeout_s
        self.late_horizon_s = late_horizon_s
        self.series_idle_s = series_idle_s
        self.series_retention_s = series_retention_s
        self._retention_ns = int(series_retention_s * 1e9)
        self._mono = monotonic
        self._wall = wall_ns
        self._versions = versioner or Versioner()
        self._versions_seeded = False  # see _seed_versions
        self._states: dict[str, SeriesState] = {}
        # hash() of every series with a state in storage not yet retired when it was read (once,
        # then after each forget()), and of every series evicted since, with when each state is
        # retired: a series in neither this nor _states is new or retired (prepare() tells which
        # when it matters) and needs no state query. Without it every flush of new series
        # waited for the storage lock held by the previous flush's commit.
        self._stored: SeriesHashes | None = None
        self._prepares = 0  # prepare() calls so far
        self._last_sweep = -math.inf
        self._held: dict[str, dict[int, _Held]] = defaultdict(dict)
        # seqs of batches that came undecodable but with a readable header (quarantined): a
        # series' gap made only of these is applied around at once, not after hold_timeout_s
        self._broken: dict[str, set[int]] = {}
        # replay batches prepared but maybe not committed yet (commit runs beside prepare)
        self._pending_replay: dict[str, dict[int, bytes]] = defaultdict(dict)

    # -- state ----------------------------------------------------------------------------------

    def _stored_series(self) -> SeriesHashes:
        """Which series have a state in storage not yet retired (by hash: a collision only costs
        a query). Series whose state this process wrote since are in ``_states`` or, once
        evicted, added here; one aggregator per installation writes states
        (docs/operations.md), so this set stays a superset of the stored states not retired."""
        if self._stored is None:
            tbl = self.storage.query_arrow(
                "SELECT concat(vm_id, ':', instance_id) AS sid, "  # noqa: S608 (constant table)
                f"toInt64(max(toUnixTimestamp(expires_at))) AS exp FROM {STATE_TABLE} "
                "WHERE toUnixTimestamp(expires_at) >= {now:Int64} GROUP BY sid",
                {"now": self._wall() // 10**9},
            )
            self._stored = SeriesHashes(
                zip(
                    (hash(x) for x in tbl.column("sid").to_pylist()),
                    tbl.column("exp").to_pylist(),
                    strict=True,
                )
            )
        return self._stored

    def _seed_versions(self) -> None:
        """Once per process: take versions above every one stored (the largest version of a
        row wins), whatever the wall clock says now. A billing row may be stored without its
        flush's state (a crash between the two writes), so both tables are read."""
        if self._versions_seeded:
            return
        rows = self.storage.query(
            f"SELECT toUInt64(max(version)) AS v FROM {STATE_TABLE} "  # noqa: S608 (constant)
            "UNION ALL SELECT toUInt64(max(version)) AS v FROM billing_hourly"
        )
        self._versions.advance_past(max((int(r["v"]) for r in rows), default=0))
        self._versions_seeded = True

    def _read_states(self, sids: list[str]) -> dict[str, SeriesState]:
        """The stored states of these series that are still in storage (retired or not)."""
        cols = ", ".join(_STATE_COLS)
        rows = self.storage.query(  # constant column/table names; ids are bound
            f"SELECT {cols}, toInt64(toUnixTimestamp(expires_at)) AS expires_s "  # noqa: S608
            f"FROM {STATE_TABLE} FINAL "
            "WHERE concat(vm_id, ':', instance_id) IN {ids:Array(String)}",
            {"ids": sids},
        )
        found = {}
        for r in rows:
            sid = _sid(r["vm_id"], r["instance_id"])
            key = SeriesKey(
                str(r["customer_id"]),
                str(r["vm_id"]),
                str(r["instance_id"]),
                int(r["vcpus"]),
                int(r["memory_total_bytes"]),
            )  # the allocation the series started with
            st = SeriesState(key=key, last_seq=int(r["last_seq"]), hour=int(r["hour"]))
            if int(r["has_last"]):
                st.last = np.array([int(r[c]) for c in _SAMPLE_COLS], dtype=np.int64)
            st.acc = HourUsage(**{f: int(r[f"acc_{f}"]) for f in FIELDS})
            st.skipped = {int(x) for x in r["skipped"]}
            if r["checkpoint"]:
                st.checkpoint = Checkpoint.from_json(str(r["checkpoint"]))
            st.expires_s = int(r["expires_s"])
            found[sid] = st
        return found

    def _load_states(self, keys: Iterable[SeriesKey], now_s: int) -> None:
        want = {_sid(k.vm_id, k.instance_id): k for k in keys}
        absent = [s for s in want if s not in self._states]
        if not absent:
            return
        known = self._stored_series().contains([hash(sid) for sid in absent], now_s)
        missing = []
        for sid, stored in zip(absent, known, strict=True):
            if stored:
                missing.append(sid)
            else:
                self._states[sid] = SeriesState(key=want[sid])  # new, or retired: see prepare()
        if not missing:
            return
        found = self._read_states(missing)
        for sid in missing:
            self._states[sid] = found.get(sid) or SeriesState(key=want[sid])

    def _check_unknown_if_needed(self, now: float, now_ns: int) -> None:
        """Check (:meth:`_check_unknown`) the series without a known state that hold a batch
        with samples older than the retention (a retired series' batches are all that old) or
        whose seq 0 did not come within the hold timeout (a retired series' next batches)."""
        cutoff = now_ns - self._retention_ns
        check = []
        for sid, held in self._held.items():
            st = self._states[sid]
            if st.last_seq >= 0 or st.checked or st.retired:
                continue
            old = any(
                len(h.batch.samples) and h.batch.samples[0, 0] < cutoff for h in held.values()
            )
            gave_up = 0 not in held and any(
                now - h.since >= self.hold_timeout_s for h in held.values()
            )
            if old or gave_up:
                check.append(sid)
        if check:
            self._check_unknown(check)

    def _check_unknown(self, sids: list[str]) -> None:
        """Series without a known state whose batches could be a retired series' (module
        docstring, "Memory"): a state still in storage is taken (placed exactly); else a series
        that has billing rows was billed and retired (its batches are quarantined); else it is
        new. Two queries for all of them; only for batches older than the retention or a
        series whose seq 0 never came."""
        found = self._read_states(sids)
        self._states.update(found)
        rest = [sid for sid in sids if sid not in found]
        if not rest:
            return
        keys = [self._states[sid].key for sid in rest]
        rows = self.storage.query(  # billing_hourly is kept for ever (it is the bill)
            "SELECT DISTINCT concat(vm_id, ':', instance_id) AS sid FROM billing_hourly "
            "WHERE customer_id IN {c:Array(String)} AND vm_id IN {v:Array(String)} "
            "AND concat(vm_id, ':', instance_id) IN {ids:Array(String)}",
            {
                "c": sorted({k.customer_id for k in keys}),
                "v": sorted({k.vm_id for k in keys}),
                "ids": rest,
            },
        )
        billed = {str(r["sid"]) for r in rows}
        for sid in rest:
            if sid in billed:
                self._states[sid].retired = True
                log.warning(
                    "series %s: its state was retired (billed, then silent for %.0f s); "
                    "its batches are quarantined (%s)",
                    sid,
                    self.series_retention_s,
                    REASON_RETIRED,
                )
            else:
                self._states[sid].checked = True

    def _state_values(self, st: SeriesState, version: int) -> str:
        k = st.key
        last = st.last if st.last is not None else np.zeros(7, dtype=np.int64)
        vals = [
            _esc(k.vm_id),
            _esc(k.instance_id),
            _esc(k.customer_id),
            str(k.vcpus),
            str(k.memory_total_bytes),
            str(st.last_seq),
            "1" if st.last is not None else "0",
            *(str(int(x)) for x in last),
            str(st.hour),
            *(str(getattr(st.acc, f)) for f in FIELDS),
            "[" + ",".join(str(x) for x in sorted(st.skipped)) + "]",
            _esc(st.checkpoint.to_json() if st.checkpoint is not None else ""),
            str(st.expires_s),
            str(version),
        ]
        return "(" + ",".join(vals) + ")"

    @property
    def series_in_memory(self) -> int:
        """How many series states are held in memory (bounded by the series seen within about
        ``series_idle_s``)."""
        return len(self._states)

    def _evict_idle(self, now: float, now_s: int) -> None:
        """Drop the in-memory state of series idle for more than ``series_idle_s`` or retired
        (module docstring, "Memory"), and forget the stored states retired since. Runs in
        prepare(), never beside another prepare()."""
        if now - self._last_sweep < self.series_idle_s / 4:
            return
        self._last_sweep = now
        prev = self._prepares - 1  # the flush whose commit may still be running
        idle = [
            sid
            for sid, st in self._states.items()
            if (now - st.seen > self.series_idle_s or 0 < st.expires_s < now_s)
            and st.prepared_in < prev
            and sid not in self._held
            and not self._pending_replay.get(sid)
        ]
        # None: not read yet; the read will see these series (their states are committed)
        stored = self._stored
        for sid in idle:
            st = self._states.pop(sid)
            self._broken.pop(sid, None)
            if stored is not None and st.expires_s >= now_s:  # 0: never stored
                stored.add(hash(sid), st.expires_s)
        retired = stored.prune(now_s) if stored is not None else 0
        # commit() empties these per batch (from its thread) but leaves the series' dict
        for sid in [s for s, d in self._pending_replay.items() if not d]:
            self._pending_replay.pop(sid, None)
        if idle or retired:
            log.info(
                "evicted %d idle series (%d kept in memory); %d stored states retired",
                len(idle),
                len(self._states),
                retired,
            )

    def forget(self) -> None:
        """Drop in-memory state (as a restart would)."""
        self._states.clear()
        self._stored = None
        self._held.clear()
        self._pending_replay.clear()
        self._broken.clear()

    # -- processing -----------------------------------------------------------------------------

    def process(self, items: Sequence[Incoming]) -> Settled:
        """Apply a flush and commit it (``commit(prepare(items))``)."""
        return self.commit(self.prepare(items))

    def prepare(self, items: Sequence[Incoming]) -> Prepared:
        """Compute a flush (advancing the in-memory series states) without writing anything.
        Commit flushes in the order they were prepared; if a commit fails, call
        :meth:`forget` and let the bus redeliver everything not acked."""
        out = Settled()
        quarantine: list[dict[str, Any]] = []
        redelivered: set[str] = set()
        self._seed_versions()
        now = self._mono()
        now_ns = self._wall()
        self._prepares += 1
        for it in items:
            try:
                b = decode_array(it.data, strict=False)
            except InvalidInput as exc:
                # No trustworthy time in it: file it under "now" (a row at t=0 would be dropped
                # by the quarantine TTL), under its series when the header can be read, with the
                # message itself (base64) so that nothing is lost. Termed after the commit.
                cid = vm = inst = bid = ""
                try:
                    k, seq = read_key(it.data)
                    cid, vm, inst, bid = (
                        k.customer_id,
                        k.vm_id,
                        k.instance_id,
                        f"{k.vm_id}:{k.instance_id}:{seq}",
                    )
                    self._broken.setdefault(_sid(k.vm_id, k.instance_id), set()).add(seq)
                except InvalidInput:
                    pass
                quarantine.append(
                    _q_row(
                        cid,
                        vm,
                        inst,
                        bid,
                        now_ns,
                        f"{REASON_INVALID_BATCH}: {exc}",
                        json.dumps(
                            {
                                "bytes": len(it.data),
                                "data_base64": base64.b64encode(bytes(it.data)).decode(),
                            }
                        ),
                    )
                )
                out.term.append(it.handle)
                continue
            sid = _sid(b.key.vm_id, b.key.instance_id)
            if it.redelivered:
                redelivered.add(b.batch_id)
            old = self._held[sid].get(b.seq)
            if (
                old is not None
                and old.item.handle != it.handle
                and (it.stream_seq is None or it.stream_seq != old.item.stream_seq)
            ):
                # the same batch stored twice: keep one copy (unacked, so it survives a crash).
                # The same stored message delivered again (its ack wait ran out while held) is
                # only replaced: acking its old delivery would ack the message itself.
                out.ack.append(old.item.handle)
            self._held[sid][b.seq] = _Held(it, b, old.since if old else now)
        now_s = now_ns // 10**9
        self._evict_idle(now, now_s)  # before loading: a series with a batch in hand is kept
        if not self._held:
            return Prepared(out, quarantine=quarantine)
        self._load_states((h.batch.key for hs in self._held.values() for h in hs.values()), now_s)
        self._check_unknown_if_needed(now, now_ns)

        # Pick, per series, the batches that can be applied now (in seq order).
        ready: dict[str, list[_Held]] = {}
        late: dict[str, list[_Held]] = {}
        done_ids: list[str] = []
        for sid, held in list(self._held.items()):
            st = self._states[sid]
            st.seen, st.prepared_in = now, self._prepares
            if st.retired:  # nothing of it can be placed: quarantined, never billed
                for h in sorted(held.values(), key=lambda h: h.batch.seq):
                    quarantine.extend(_q_batch(h.batch, REASON_RETIRED))
                    out.ack.append(h.item.handle)
                    done_ids.append(h.batch.batch_id)
                    out.samples += len(h.batch.samples)
                del self._held[sid]
                continue
            cp = st.checkpoint
            if cp is not None and now_ns - cp.since_ns > self.late_horizon_s * 1e9:
                log.warning("series %s: gave up waiting for batches %s", sid, sorted(st.skipped))
                st.checkpoint = None  # a skipped batch that still comes is quarantined
            for seq in [s for s in held if s <= st.last_seq]:
                h = held.pop(seq)
                if seq in st.skipped:
                    late.setdefault(sid, []).append(h)  # applied below, by a replay
                else:
                    out.ack.append(h.item.handle)  # a duplicate: already committed
            for seq in sorted(s for s in held if s > st.last_seq + MAX_SEQ_AHEAD):
                h = held.pop(seq)
                log.warning("series %s: batch seq %d is far ahead of %d", sid, seq, st.last_seq)
                quarantine.extend(_q_batch(h.batch, REASON_SEQ_RANGE))
                out.ack.append(h.item.handle)
                done_ids.append(h.batch.batch_id)
                out.samples += len(h.batch.samples)
            run: list[_Held] = []
            nxt = st.last_seq + 1
            while nxt in held:
                run.append(held.pop(nxt))
                nxt += 1
            broken = self._broken.pop(sid, set())
            if held and not run:
                oldest = min(held.values(), key=lambda h: h.since)
                first = min(held)
                # a gap of broken batches only (quarantined: they will not come intact) is not
                # waited for; one that does come after all is a late batch (replayed, below)
                gap_broken = first - st.last_seq - 1 <= len(broken) and all(
                    q in broken for q in range(st.last_seq + 1, first)
                )
                if now - oldest.since >= self.hold_timeout_s or gap_broken:
                    log.warning(
                        "series %s: batches %d..%d %s; applying %d without them",
                        sid,
                        st.last_seq + 1,
                        first - 1,
                        "came broken (quarantined)" if gap_broken else "never arrived",
                        first,
                    )
                    if st.checkpoint is None:
                        st.checkpoint = st.snapshot(now_ns)
                    st.skipped.update(range(st.last_seq + 1, first))
                    nxt = first
                    while nxt in held:
                        run.append(held.pop(nxt))
                        nxt += 1
            # broken seqs not reached yet (the series' state is behind them) wait for their gap
            if broken := {q for q in broken if q > max(st.last_seq, nxt - 1)}:
                self._broken[sid] = broken
            if run:
                ready[sid] = run
            if not held:
                del self._held[sid]
        out.held = sum(len(h) for h in self._held.values())

        raw = _RawBuilder()
        billing: list[BillingHourlyRow] = []
        new_states: dict[str, SeriesState] = {}
        raw_ids: list[str] = []
        replay: list[tuple[SeriesKey, int, bytes]] = []
        # Pass 1: who may be billed (customer, VM, allocation); the rest is quarantined.
        jobs: list[tuple[SeriesState, list[_Held], CustomerInfo]] = []
        for sid, run in ready.items():
            st = self._states[sid]
            key = run[0].batch.key
            done_ids += [h.batch.batch_id for h in run]
            out.ack += [h.item.handle for h in run]
            out.samples += sum(len(h.batch.samples) for h in run)
            if st.last_seq < 0 and st.last is None:
                st.key = key  # a new series: its first batch fixes the allocation
            cust, reason = self._admit(st, key)
            if reason is not None or cust is None:
                for h in run:
                    quarantine.extend(_q_batch(h.batch, reason or REASON_UNKNOWN_CUSTOMER))
                st.last_seq = run[-1].batch.seq
                new_states[sid] = st
                continue
            if st.checkpoint is not None:  # an earlier batch is missing: keep these for a replay
                for h in run:
                    replay.append((st.key, h.batch.seq, h.item.data))
                    self._pending_replay[sid][h.batch.seq] = h.item.data
            jobs.append((st, run, cust))

        # Pass 2: clean all series at once (vectorised across them).
        arrs = [
            run[0].batch.samples
            if len(run) == 1
            else np.concatenate([h.batch.samples for h in run])
            for _st, run, _c in jobs
        ]
        many = clean_many(
            [st.last for st, _r, _c in jobs],
            arrs,
            [st.key.vcpus for st, _r, _c in jobs],
            [st.key.memory_total_bytes for st, _r, _c in jobs],
        )
        if len(many.rows):
            fast_runs = [run for j, (_s, run, _c) in enumerate(jobs) if many.fast[j]]
            raw.add_many([jobs[j][0].key for j in range(len(jobs))], many, fast_runs)
            raw_ids += [h.batch.batch_id for run in fast_runs for h in run]

        # Pass 3: per series, the slow ones' raw rows and quarantine, billing rows and states.
        for j, (st, run, cust) in enumerate(jobs):
            key = st.key
            if many.fast[j]:
                hours_j, last_j = many.hours[j], many.last[j]
            else:
                c = many.slow[j]
                seq_of_row = np.repeat(np.arange(len(run)), [len(h.batch.samples) for h in run])
                for i, why in c.reasons.items():
                    b = run[int(seq_of_row[c.src[i]])].batch
                    quarantine.append(
                        _q_row(
                            key.customer_id,
                            key.vm_id,
                            key.instance_id,
                            b.batch_id,
                            int(c.rows[i, 0]),
                            why,
                            json.dumps(dict(zip(COLUMNS, c.rows[i].tolist(), strict=True))),
                        )
                    )
                if c.valid.any():
                    raw.add(key, c, seq_of_row[c.src[c.valid]], [h.batch.batch_id for h in run])
                    raw_ids += [h.batch.batch_id for h in run]
                for i, why in c.dropped.items():
                    b = run[int(seq_of_row[i])].batch
                    row = arrs[j][i]
                    quarantine.append(_q_sample(key, b.batch_id, row, why))
                hours_j, last_j = c.hours, c.last
            sheet = pricing.price_sheet(self.pricing_version, cust.pricing_tier)
            hours = _advance(st, hours_j, last_j)
            version = self._versions.next()
            for hour, u in sorted(hours.items()):
                billing.append(_billing_row(key, cust, hour, u, sheet, version))
            st.last_seq = run[-1].batch.seq
            new_states[_sid(key.vm_id, key.instance_id)] = st

        # Pass 4: batches that come after their seq was skipped: replay their series.
        for sid, hs in late.items():
            st = self._states[sid]
            hs.sort(key=lambda h: h.batch.seq)
            out.ack += [h.item.handle for h in hs]
            done_ids += [h.batch.batch_id for h in hs]
            out.samples += sum(len(h.batch.samples) for h in hs)
            new_states[sid] = st
            cust, reason = self._admit(st, hs[0].batch.key)
            if reason is None and st.checkpoint is None:
                reason = REASON_TOO_LATE
            if reason is None and cust is not None:
                reason = self._replay_late(st, hs, cust, billing, quarantine, replay)
            if reason is not None:
                for h in hs:
                    quarantine.extend(_q_batch(h.batch, reason))
                st.skipped -= {h.batch.seq for h in hs}
                if not st.skipped:
                    st.checkpoint = None

        state_sql = None
        if new_states:
            v = self._versions.next()
            for sid, st in new_states.items():
                newest = max(
                    (
                        int(h.batch.samples[-1, 0])
                        for h in (*ready.get(sid, ()), *late.get(sid, ()))
                    ),
                    default=0,
                )
                # never earlier than before (see the migration 009): R after the newest sample
                # and after this batch, so a series that still sends keeps its state
                st.expires_s = max(
                    st.expires_s, (max(newest, now_ns) + self._retention_ns) // 10**9
                )
            cols = ", ".join((*_STATE_COLS, "expires_at", "version"))
            state_sql = (
                f"INSERT INTO {STATE_TABLE} ({cols}) VALUES "  # noqa: S608 (numbers, or escaped by _esc)
                + ",".join(self._state_values(st, v) for st in new_states.values())
            )
        return Prepared(
            out,
            raw=raw.table() if raw.parts else None,
            raw_ids=raw_ids,
            redelivered=redelivered,
            quarantine=quarantine,
            billing=billing,
            state_sql=state_sql,
            done_ids=done_ids,
            replay=replay,
        )

    def _admit(self, st: SeriesState, key: SeriesKey) -> tuple[CustomerInfo | None, str | None]:
        """The customer of a series' batch, or why the batch may not be billed."""
        cust = self.directory.customer(key.customer_id)
        if cust is None:
            return None, REASON_UNKNOWN_CUSTOMER
        if not self.directory.known_vm(key.customer_id, key.vm_id):
            return cust, REASON_UNKNOWN_VM
        if (st.key.customer_id, st.key.vcpus, st.key.memory_total_bytes) != (
            key.customer_id,
            key.vcpus,
            key.memory_total_bytes,
        ):
            return cust, REASON_ALLOCATION
        return cust, None

    def _stored_batches(self, st: SeriesState, cp: Checkpoint) -> dict[int, Samples]:
        """The batches applied to ``st`` after its checkpoint (and not skipped), by seq."""
        k = st.key
        sid = _sid(k.vm_id, k.instance_id)
        pending = dict(self._pending_replay.get(sid, {}))  # before storage: see commit()
        rows = self.storage.query(
            f"SELECT seq, hex(data) AS data FROM {REPLAY_TABLE} FINAL "  # noqa: S608
            "WHERE vm_id = {vm:String} AND instance_id = {inst:String} "
            "AND seq > {lo:Int64} AND seq <= {hi:Int64}",
            {"vm": k.vm_id, "inst": k.instance_id, "lo": cp.last_seq, "hi": st.last_seq},
        )
        raw = {int(r["seq"]): bytes.fromhex(str(r["data"])) for r in rows}
        raw.update((q, d) for q, d in pending.items() if cp.last_seq < q <= st.last_seq)
        return {
            q: decode_array(d, strict=False).samples for q, d in raw.items() if q not in st.skipped
        }

    def _replay_late(  # noqa: PLR0917
        self,
        st: SeriesState,
        hs: list[_Held],
        cust: CustomerInfo,
        billing: list[BillingHourlyRow],
        quarantine: list[dict[str, Any]],
        replay: list[tuple[SeriesKey, int, bytes]],
    ) -> str | None:
        """Apply late batches ``hs`` (skipped seqs of ``st``) by replaying the series from its
        checkpoint; append the recomputed hours and newly invalid samples. Returns a quarantine
        reason instead when the stored batches do not give the current state back."""
        cp = st.checkpoint
        if cp is None:
            return REASON_TOO_LATE
        key = st.key
        stored = self._stored_batches(st, cp)
        arrived = {h.batch.seq: h.batch.samples for h in hs}
        old = _replay(key, cp, stored, None)
        if not old.st.same_usage(st):
            log.error(
                "series %s:%s: replay from the checkpoint does not give the stored state; "
                "late batches %s quarantined",
                key.vm_id,
                key.instance_id,
                sorted(arrived),
            )
            return REASON_REPLAY
        remaining = st.skipped - arrived.keys()
        log.info(
            "series %s:%s: late batches %s applied by a replay of %d batches from seq %d",
            key.vm_id,
            key.instance_id,
            sorted(arrived),
            len(stored),
            cp.last_seq + 1,
        )
        new = _replay(key, cp, {**stored, **arrived}, min(remaining) if remaining else None)
        sheet = pricing.price_sheet(self.pricing_version, cust.pricing_tier)
        version = self._versions.next()
        for hour in sorted(old.hours.keys() | new.hours.keys()):
            u = new.hours.get(hour, HourUsage())  # an hour left without usage: a zero row
            billing.append(_billing_row(key, cust, hour, u, sheet, version))
        for where, (why, row) in sorted(new.invalid.items()):
            if where not in old.invalid:
                quarantine.append(
                    _q_sample(key, f"{key.vm_id}:{key.instance_id}:{where[0]}", row, why)
                )
        st.last, st.hour, st.acc = new.st.last, new.st.hour, new.st.acc
        st.skipped = set(remaining)
        if remaining and new.checkpoint is not None:
            new.checkpoint.since_ns = cp.since_ns
            st.checkpoint = new.checkpoint
        else:
            st.checkpoint = None
        if st.checkpoint is not None:
            sid = _sid(key.vm_id, key.instance_id)
            for h in hs:
                replay.append((key, h.batch.seq, h.item.data))
                self._pending_replay[sid][h.batch.seq] = h.item.data
        return None

    def commit(self, p: Prepared) -> Settled:
        """Write a prepared flush: raw + quarantine, billing rows, then the series states (the
        commit point), then the processed markers. Returns what to ack/term."""
        out = p.out
        if p.raw is not None:
            table = p.raw
            wanted = [i for i in p.raw_ids if i in p.redelivered]
            present = self.storage.raw_batches_present(wanted) if wanted else set()
            if present:
                keep = pa.compute.invert(
                    pa.compute.is_in(table.column("batch_id"), pa.array(sorted(present)))
                )
                table = table.filter(keep)
            if table.num_rows:
                token = hashlib.sha256("\n".join(sorted(p.raw_ids)).encode()).hexdigest()
                self.storage.insert_raw(table, token)
            out.raw_rows = table.num_rows
        self._write_quarantine(p.quarantine)
        self._write_replay(p.replay)
        if p.billing:
            self.storage.upsert_billing_hourly(p.billing)
            out.billing_rows = len(p.billing)
        if p.state_sql is not None:
            self.storage.command(p.state_sql)
        if p.done_ids:
            self.storage.mark_processed(p.done_ids)
        return out

    def _write_replay(self, rows: list[tuple[SeriesKey, int, bytes]]) -> None:
        """Store batches for later replays, then forget the in-memory copies (a prepare that
        runs meanwhile reads the copies first, then the table: it sees each batch once)."""
        for i in range(0, len(rows), 64):
            chunk = rows[i : i + 64]
            values = ",".join(
                f"({_esc(k.customer_id)},{_esc(k.vm_id)},{_esc(k.instance_id)},{seq},"
                f"unhex('{data.hex()}'))"
                for k, seq, data in chunk
            )
            self.storage.command(
                f"INSERT INTO {REPLAY_TABLE} (customer_id, vm_id, instance_id, seq, data) "  # noqa: S608
                f"VALUES {values}"
            )
        for k, seq, data in rows:
            pending = self._pending_replay.get(_sid(k.vm_id, k.instance_id))
            if pending is not None and pending.get(seq) is data:
                del pending[seq]

    def held_handles(self) -> list[Any]:
        return [h.item.handle for hs in self._held.values() for h in hs.values()]

    def _write_quarantine(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        tbl = pa.Table.from_pylist(rows, schema=_Q_SCHEMA)
        token = hashlib.sha256(
            "\n".join(f"{r['batch_id']}|{r['timestamp']}|{r['reason']}" for r in rows).encode()
        ).hexdigest()
        self.storage.insert_quarantine(tbl, token)


_Q_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("vm_id", pa.string()),
        ("instance_id", pa.string()),
        ("batch_id", pa.string()),
        ("timestamp", pa.timestamp("ns", tz="UTC")),
        ("reason", pa.string()),
        ("sample_json", pa.string()),
    ]
)


def _q_row(  # noqa: PLR0917 (one quarantine row, all fields)
    customer_id: str, vm_id: str, instance_id: str, batch_id: str, t: int, reason: str, js: str
) -> dict[str, Any]:
    return {
        "customer_id": customer_id,
        "vm_id": vm_id,
        "instance_id": instance_id,
        "batch_id": batch_id,
        "timestamp": t,
        "reason": reason,
        "sample_json": js,
    }


def _q_sample(key: SeriesKey, batch_id: str, row: Any, reason: str) -> dict[str, Any]:
    vals = [int(x) for x in row]
    return _q_row(
        key.customer_id,
        key.vm_id,
        key.instance_id,
        batch_id,
        vals[0],
        reason,
        json.dumps(dict(zip(COLUMNS, vals, strict=True))),
    )


def _advance(
    st: SeriesState, hours_j: dict[int, HourUsage], last_j: np.ndarray | None
) -> dict[int, HourUsage]:
    """Add the usage of newly cleaned samples (per hour, ``last_j`` their last valid one) to a
    series' state; returns each touched hour's full usage (the state's running total of its
    current hour included)."""
    hours = dict(hours_j)
    if st.hour in hours:
        merged = st.acc.copy()
        merged.add(hours[st.hour])
        hours[st.hour] = merged
    if last_j is not None and (st.last is None or int(last_j[0]) != int(st.last[0])):
        last_hour = int(last_j[0]) // NS_PER_HOUR
        st.acc = hours[last_hour].copy() if last_hour in hours else HourUsage()
        st.hour = last_hour
    st.last = last_j
    return hours


@dataclass
class _Replayed:
    st: SeriesState
    hours: dict[int, HourUsage]  # every hour touched, full usage
    invalid: dict[tuple[int, int], tuple[str, list[int]]]  # (seq, index) -> (reason, sample)
    checkpoint: Checkpoint | None  # the state just before seq ``stop``


def _replay(
    key: SeriesKey, cp: Checkpoint, batches: dict[int, Samples], stop: int | None
) -> _Replayed:
    """Apply ``batches`` (by seq) in seq order to the checkpoint's state, as in-order delivery
    would have; with ``stop`` (a seq still missing), also the state just before it."""
    st = SeriesState(key=key, last_seq=cp.last_seq, last=cp.last, hour=cp.hour, acc=cp.acc.copy())
    out = _Replayed(st, {}, {}, None)
    seqs = sorted(batches)
    parts = [
        [q for q in seqs if stop is None or q < stop],
        [q for q in seqs if stop is not None and q > stop],
    ]
    for n, part in enumerate(parts):
        if n == 1 and stop is not None:
            out.checkpoint = Checkpoint(stop - 1, st.last, st.hour, st.acc.copy(), cp.since_ns)
        if not part:
            continue
        arr = np.concatenate([batches[q] for q in part])
        lens = [len(batches[q]) for q in part]
        seq_of = np.repeat(np.array(part, dtype=np.int64), lens)
        first = np.repeat(np.cumsum([0, *lens[:-1]]), lens)
        c = clean(st.last, arr, key.vcpus, key.memory_total_bytes)
        for i, why in c.reasons.items():
            src = int(c.src[i])
            out.invalid[(int(seq_of[src]), src - int(first[src]))] = (why, c.rows[i].tolist())
        for src, why in c.dropped.items():
            out.invalid[(int(seq_of[src]), src - int(first[src]))] = (why, arr[src].tolist())
        out.hours.update(_advance(st, c.hours, c.last))
        st.last_seq = part[-1]
    return out


def _q_batch(b: DecodedBatch, reason: str) -> list[dict[str, Any]]:
    k = b.key
    return [
        _q_row(
            k.customer_id,
            k.vm_id,
            k.instance_id,
            b.batch_id,
            int(r[0]),
            reason,
            json.dumps(dict(zip(COLUMNS, r, strict=True))),
        )
        for r in b.samples.tolist()
    ]


def _mem_byte_ns(mem: np.ndarray, dt: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """``mem x dt`` where ``counted`` (else 0), exact, as (n, 2) uint64 little-endian limbs of a
    128-bit integer (the layout of Arrow's decimal128): the product passes 2^64 for 17 GiB held
    1 s. ``mem`` < 2^63, ``dt`` <= 1 s < 2^30 where counted."""
    a = np.where(counted, mem, 0).astype(np.uint64)
    b = np.where(counted, dt, 0).astype(np.uint64)
    x = (a >> np.uint64(32)) * b  # < 2^61
    y = (a & np.uint64(0xFFFFFFFF)) * b  # < 2^62
    lo = (x << np.uint64(32)) + y  # wraps modulo 2^64
    carry = (lo < y).astype(np.uint64)
    out = np.empty((len(a), 2), dtype=np.uint64)
    out[:, 0] = lo
    out[:, 1] = (x >> np.uint64(32)) + carry
    return out


class _RawBuilder:
    """Raw interval rows of a flush as numpy parts, turned into ONE Arrow table (one chunk per
    column: chDB inserts a many-chunk table much slower)."""

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []
        self._dicts: dict[str, dict[str, int]] = {
            "customer_id": {},
            "vm_id": {},
            "instance_id": {},
            "batch_id": {},
        }

    def _code(self, col: str, value: str) -> int:
        d = self._dicts[col]
        return d.setdefault(value, len(d))

    def add(self, key: SeriesKey, c: Any, batch_idx: np.ndarray, batch_ids: list[str]) -> None:
        v = c.valid
        rows = c.rows[v]
        d = c.deltas[v]
        n = len(rows)
        dt = d[:, 0]
        before_mem = rows[:, 2] - d[:, 2]  # gauge of the previous valid sample (a)
        counted = (dt > 0) & (dt <= pricing.NS_PER_S)
        codes = np.array([self._code("batch_id", b) for b in batch_ids], dtype=np.int32)
        self.parts.append(
            {
                "customer_id": np.full(n, self._code("customer_id", key.customer_id), np.int32),
                "vm_id": np.full(n, self._code("vm_id", key.vm_id), np.int32),
                "instance_id": np.full(n, self._code("instance_id", key.instance_id), np.int32),
                "timestamp": rows[:, 0],
                "interval_ns": dt,
                "cpu_time_ns": d[:, 1],
                "cpu_usage_percent": c.cpu_percent[v],
                "memory_used_bytes": rows[:, 2],
                "memory_total_bytes": np.full(n, key.memory_total_bytes, np.int64),
                "vcpus": np.full(n, key.vcpus, np.uint16),
                "network_rx_bytes": d[:, 3],
                "network_tx_bytes": d[:, 4],
                "disk_read_bytes": d[:, 5],
                "disk_write_bytes": d[:, 6],
                "mem_byte_ns": _mem_byte_ns(before_mem, dt, counted),
                "gap_ns": np.where(dt > pricing.NS_PER_S, dt, 0),
                "batch_id": codes[batch_idx],
            }
        )

    def add_many(self, keys: list[SeriesKey], m: Many, fast_runs: list[list[_Held]]) -> None:
        """The vectorised path's rows: all valid, in series order, each series' batches in
        order (``fast_runs``: the batches of the series with ``m.fast``)."""
        n = len(m.rows)
        cc = np.array([self._code("customer_id", k.customer_id) for k in keys], np.int32)
        vc = np.array([self._code("vm_id", k.vm_id) for k in keys], np.int32)
        ic = np.array([self._code("instance_id", k.instance_id) for k in keys], np.int32)
        mt = np.array([k.memory_total_bytes for k in keys], np.int64)
        vcpu = np.array([k.vcpus for k in keys], np.uint16)
        bcodes = np.array(
            [self._code("batch_id", h.batch.batch_id) for run in fast_runs for h in run], np.int32
        )
        blens = [len(h.batch.samples) for run in fast_runs for h in run]
        d = m.deltas
        dt = d[:, 0]
        counted = (dt > 0) & (dt <= pricing.NS_PER_S)
        self.parts.append(
            {
                "customer_id": cc[m.job],
                "vm_id": vc[m.job],
                "instance_id": ic[m.job],
                "timestamp": m.rows[:, 0],
                "interval_ns": dt,
                "cpu_time_ns": d[:, 1],
                "cpu_usage_percent": m.cpu_percent,
                "memory_used_bytes": m.rows[:, 2],
                "memory_total_bytes": mt[m.job],
                "vcpus": vcpu[m.job],
                "network_rx_bytes": d[:, 3],
                "network_tx_bytes": d[:, 4],
                "disk_read_bytes": d[:, 5],
                "disk_write_bytes": d[:, 6],
                "mem_byte_ns": _mem_byte_ns(m.before_mem, dt, counted),
                "gap_ns": np.where(dt > pricing.NS_PER_S, dt, 0),
                "batch_id": np.repeat(bcodes, blens),
            }
        )
        if sum(blens) != n:
            raise AssertionError("raw rows and batch lengths disagree")  # a bug, not input

    def table(self) -> pa.Table:
        cols: dict[str, pa.Array] = {}
        for name in self.parts[0]:
            arr = np.concatenate([p[name] for p in self.parts])
            if name in self._dicts:
                words = list(self._dicts[name])
                cols[name] = pa.DictionaryArray.from_arrays(pa.array(arr), pa.array(words)).cast(
                    pa.string()
                )
            elif name == "timestamp":
                cols[name] = pa.array(arr, pa.timestamp("ns", tz="UTC"))
            elif name == "cpu_usage_percent":
                cols[name] = pa.array(arr.astype(np.float32))
            elif name == "vcpus":
                cols[name] = pa.array(arr.astype(np.uint16))
            elif name == "mem_byte_ns":  # 128-bit limbs (see _mem_byte_ns)
                buf = pa.py_buffer(np.ascontiguousarray(arr, dtype="<u8").tobytes())
                cols[name] = pa.Array.from_buffers(pa.decimal128(38, 0), len(arr), [None, buf])
            else:
                cols[name] = pa.array(arr.astype(np.uint64))
        return pa.table(cols)


def _billing_row(  # noqa: PLR0917
    key: SeriesKey,
    cust: CustomerInfo,
    hour: int,
    u: HourUsage,
    sheet: pricing.PriceSheet,
    version: int,
) -> BillingHourlyRow:
    return BillingHourlyRow(
        customer_id=key.customer_id,
        vm_id=key.vm_id,
        instance_id=key.instance_id,
        hour=datetime.fromtimestamp(hour * 3600, UTC),
        cpu_time_ns=u.cpu_ns,
        mem_byte_ns=u.mem_byte_ns,
        net_rx_bytes=u.net_rx_bytes,
        net_tx_bytes=u.net_tx_bytes,
        disk_read_bytes=u.disk_read_bytes,
        disk_write_bytes=u.disk_write_bytes,
        gap_ns=u.gap_ns,
        sample_count=u.samples,
        storage_byte_ns=0,
        cost=pricing.hour_cost(sheet, u.cpu_ns, u.mem_byte_ns, u.net_bytes),
        pricing_version=sheet.version,
        version=version,
    )
