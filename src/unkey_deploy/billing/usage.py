"""Cleaning and usage of one series, exactly as BILLING.md defines them. Pure functions.

Samples are ``(n, 7)`` int64 arrays in :data:`unkey_deploy.metering.codec.COLUMNS` order
(t, cpu_time_ns, memory_used_bytes, net_rx, net_tx, disk_read, disk_write). Everything is
vectorised with numpy; only a series that really holds invalid samples takes the sequential
path (each invalid sample changes what the next one is compared against).

Units stay integers: CPU ns, memory byte x ns, bytes, gap ns. Memory byte x ns per hour can pass
2^64, so its sums are built from 16-bit limbs of the memory value (each limb x dt summed over an
hour stays below 2^58) and combined as Python ints per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .pricing import NS_PER_HOUR, NS_PER_S

Arr = npt.NDArray[np.int64]
T, CPU, MEM, RX, TX, DR, DW = range(7)
COUNTERS = (CPU, RX, TX, DR, DW)

REASON_COUNTER = "counter_decreased"
REASON_CPU = "cpu_over_100_percent"
REASON_MEMORY = "memory_over_allocation"
# Counters start at 0 at boot (BILLING.md "Inputs"), so a negative one is lower than the boot
# value; a negative gauge or timestamp is not a reading at all.
REASON_NEGATIVE = "negative_value"
# A second sample with a t already in the samples being cleaned (BILLING.md "Cleaning" 2:
# ignored, never billed) is quarantined, so a producer's fault is visible. A sample at or before
# the series' last valid one (``prev``) is ignored without a quarantine row: that is what a
# replayed import or a re-sent batch looks like (see billing/importer.py), not a fault.
REASON_DUPLICATE_T = "duplicate_timestamp"


@dataclass
class HourUsage:
    """Integer usage of one series in one UTC hour (``hour`` = hour index since the epoch)."""

    cpu_ns: int = 0
    mem_byte_ns: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    gap_ns: int = 0
    gaps: int = 0
    samples: int = 0

    @property
    def net_bytes(self) -> int:
        return self.net_rx_bytes + self.net_tx_bytes

    def add(self, o: HourUsage) -> None:
        for f in FIELDS:
            setattr(self, f, getattr(self, f) + getattr(o, f))

    def copy(self) -> HourUsage:
        return HourUsage(**{f: getattr(self, f) for f in FIELDS})


FIELDS = (
    "cpu_ns",
    "mem_byte_ns",
    "net_rx_bytes",
    "net_tx_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
    "gap_ns",
    "gaps",
    "samples",
)


@dataclass
class Cleaned:
    """The result of cleaning samples that follow ``prev`` (the last valid sample before them).

    ``rows`` are the input sorted by t without duplicate t (and without t <= prev.t);
    ``valid`` marks the valid ones; ``deltas`` (n, 7) are, for valid rows, the counter deltas
    against the previous valid sample (t column: dt, 0 for a series' first sample); ``reasons``
    maps invalid row index -> reason; ``hours`` the usage per hour of the valid intervals;
    ``dropped`` maps the input index of each repeated-t sample left out of ``rows`` -> reason
    (samples at or before ``prev`` are left out silently).
    """

    rows: Arr
    src: npt.NDArray[np.intp]  # index of each row in the input
    valid: npt.NDArray[np.bool_]
    deltas: Arr
    cpu_percent: npt.NDArray[np.float32]
    reasons: dict[int, str]
    hours: dict[int, HourUsage] = field(default_factory=dict)
    last: Arr | None = None  # last valid sample after these rows (prev if none is valid)
    dropped: dict[int, str] = field(default_factory=dict)


def dedupe_sorted(arr: Arr, after_t: int | None = None) -> tuple[Arr, npt.NDArray[np.intp]]:
    """Sort by t, keep the first sample of each t, and drop those at or before ``after_t``.
    Returns the rows and their indices in ``arr``."""
    if len(arr) == 0:
        return arr.reshape(0, 7), np.zeros(0, dtype=np.intp)
    t = arr[:, T]
    if len(t) < 2 or bool(np.all(t[1:] > t[:-1])):
        order = np.arange(len(arr))  # already in order (the usual case): no sort
    else:
        order = np.argsort(t, kind="stable")
    s = arr[order]
    keep = np.ones(len(s), dtype=bool)
    keep[1:] = s[1:, T] != s[:-1, T]
    if after_t is not None:
        keep &= s[:, T] > after_t
    if keep.all():
        return s, order
    return s[keep], order[keep]


def _checks(prev: Arr, rows: Arr, vcpus: int, mem_total: int) -> npt.NDArray[np.bool_]:
    """Validity of each row against its immediate predecessor (``prev`` then rows[:-1])."""
    before = np.vstack([prev[None, :], rows[:-1]])
    d = rows - before
    ok = _sane(rows)
    ok &= np.all(d[:, COUNTERS] >= 0, axis=1)
    ok &= d[:, CPU] <= vcpus * d[:, T]
    ok &= rows[:, MEM] <= mem_total
    result: npt.NDArray[np.bool_] = ok
    return result


def _sane(rows: Arr) -> npt.NDArray[np.bool_]:
    """No negative value (see REASON_NEGATIVE)."""
    ok: npt.NDArray[np.bool_] = np.all(rows >= 0, axis=1)
    return ok


def _reason(prev: Arr | None, row: Arr, vcpus: int, mem_total: int) -> str | None:
    if row[MEM] > mem_total:
        return REASON_MEMORY
    if prev is None:
        return None
    if any(int(row[c]) < int(prev[c]) for c in COUNTERS):
        return REASON_COUNTER
    if int(row[CPU]) - int(prev[CPU]) > vcpus * (int(row[T]) - int(prev[T])):
        return REASON_CPU
    return None


def _valid_mask(
    prev: Arr | None, rows: Arr, vcpus: int, mem_total: int
) -> tuple[npt.NDArray[np.bool_], dict[int, str]]:
    n = len(rows)
    if n == 0:
        return np.zeros(0, dtype=bool), {}
    if prev is not None:
        fast = _checks(prev, rows, vcpus, mem_total)
    else:
        fast = np.ones(n, dtype=bool)
        fast[1:] = _checks(rows[0], rows[1:], vcpus, mem_total)
        fast[0] = rows[0, MEM] <= mem_total and bool(_sane(rows[:1])[0])
    if fast.all():
        return fast, {}
    # Sequential from the first failure: each invalid sample changes the next comparison.
    first = int(np.argmin(fast))
    valid = fast.copy()
    reasons: dict[int, str] = {}
    last: Arr | None = rows[first - 1] if first > 0 else prev
    sane = _sane(rows).tolist()
    for i in range(first, n):
        r = _reason(last, rows[i], vcpus, mem_total) if sane[i] else REASON_NEGATIVE
        if r is None:
            valid[i] = True
            last = rows[i]
        else:
            valid[i] = False
            reasons[i] = r
    return valid, reasons


def _limb_sums(mem: Arr, dt: Arr, starts: npt.NDArray[np.intp]) -> list[int]:
    """Σ mem x dt per group (groups start at ``starts``), exact, as Python ints."""
    total = [0] * len(starts)
    m = mem.astype(np.uint64)
    d = dt.astype(np.uint64)
    for k in range(4):
        limb = (m >> np.uint64(16 * k)) & np.uint64(0xFFFF)
        if not limb.any():
            continue
        sums = np.add.reduceat(limb * d, starts).tolist()
        for g, s in enumerate(sums):
            total[g] += int(s) << (16 * k)
    return total


def clean(prev: Arr | None, samples: Arr, vcpus: int, mem_total: int) -> Cleaned:
    """Clean ``samples`` that follow ``prev`` and compute the usage of their intervals.

    ``prev`` is the last valid sample of the series before these (None: the series starts
    here, and its first valid sample counts its whole counter values)."""
    rows, src = dedupe_sorted(samples, None if prev is None else int(prev[T]))
    n = len(rows)
    valid, reasons = _valid_mask(prev, rows, vcpus, mem_total)
    deltas = np.zeros((n, 7), dtype=np.int64)
    cpu_pct = np.zeros(n, dtype=np.float32)
    out = Cleaned(
        rows=rows, src=src, valid=valid, deltas=deltas, cpu_percent=cpu_pct, reasons=reasons
    )
    if n < len(samples):
        kept = np.zeros(len(samples), dtype=bool)
        kept[src] = True
        after = None if prev is None else int(prev[T])
        for i in np.flatnonzero(~kept).tolist():
            if after is None or int(samples[i, T]) > after:
                out.dropped[i] = REASON_DUPLICATE_T
    vidx = np.flatnonzero(valid)
    if len(vidx) == 0:
        out.last = prev
        return out
    v = rows[vidx]
    if prev is not None:
        before = np.vstack([prev[None, :], v[:-1]])
        d = v - before
    else:
        before = np.vstack([np.zeros((1, 7), dtype=np.int64), v[:-1]])
        d = v - before
        d[0, T] = 0  # no interval before a series' first sample: counters count whole values
    deltas[vidx] = d
    dt = d[:, T]
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(dt > 0, 100.0 * d[:, CPU] / (vcpus * np.maximum(dt, 1)), 0.0)
    cpu_pct[vidx] = pct.astype(np.float32)
    # memory: a.memory_used x dt for intervals of at most 1 s; longer ones are gaps.
    counted = (dt > 0) & (dt <= NS_PER_S)
    gap = dt > NS_PER_S
    mem_dt = np.where(counted, dt, 0)
    hour = v[:, T] // NS_PER_HOUR
    starts = np.flatnonzero(np.concatenate(([True], hour[1:] != hour[:-1])))
    sums = np.add.reduceat(d[:, 1:], starts, axis=0).tolist()  # cpu, mem(unused), rx, tx, dr, dw
    gap_ns = np.add.reduceat(np.where(gap, dt, 0), starts).tolist()
    gaps = np.add.reduceat(gap.astype(np.int64), starts).tolist()
    counts = np.diff(np.append(starts, len(v))).tolist()
    mem = _limb_sums(before[:, MEM], mem_dt, starts)
    for g, s in enumerate(starts.tolist()):
        row = sums[g]
        out.hours[int(hour[s])] = HourUsage(
            cpu_ns=int(row[0]),
            mem_byte_ns=mem[g],
            net_rx_bytes=int(row[2]),
            net_tx_bytes=int(row[3]),
            disk_read_bytes=int(row[4]),
            disk_write_bytes=int(row[5]),
            gap_ns=int(gap_ns[g]),
            gaps=int(gaps[g]),
            samples=int(counts[g]),
        )
    out.last = v[-1].copy()
    return out


@dataclass
class Many:
    """:func:`clean_many` for the series that took the vectorised path (``fast``): their rows
    concatenated in input order (all valid), with ``job`` = the series' index per row."""

    fast: npt.NDArray[np.bool_]  # per series
    job: npt.NDArray[np.intp]
    rows: Arr
    deltas: Arr
    cpu_percent: npt.NDArray[np.float32]
    before_mem: Arr
    hours: list[dict[int, HourUsage]]  # per series (empty for slow ones)
    last: list[Arr | None]  # per series: last valid sample (slow ones: see ``slow``)
    slow: dict[int, Cleaned]


def clean_many(
    prevs: list[Arr | None], arrs: list[Arr], vcpus: list[int], mem_total: list[int]
) -> Many:
    """:func:`clean` for many series at once, vectorised across them. A series whose samples
    are in strict time order after ``prev`` and all valid (the usual case) is computed in one
    pass over the concatenation; any other goes through :func:`clean` (same result)."""
    nj = len(arrs)
    lens = np.array([len(a) for a in arrs], dtype=np.intp)
    empty = Many(
        fast=np.zeros(nj, dtype=bool),
        job=np.zeros(0, dtype=np.intp),
        rows=np.zeros((0, 7), dtype=np.int64),
        deltas=np.zeros((0, 7), dtype=np.int64),
        cpu_percent=np.zeros(0, dtype=np.float32),
        before_mem=np.zeros(0, dtype=np.int64),
        hours=[{} for _ in range(nj)],
        last=list(prevs),  # unchanged when a series brings no valid sample
        slow={},
    )
    if nj == 0:
        return empty
    x = np.concatenate(arrs) if nj > 1 else arrs[0]
    job = np.repeat(np.arange(nj), lens)
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    nonempty = lens > 0
    has_prev = np.array([p is not None for p in prevs], dtype=bool)
    prev_rows = np.stack([p if p is not None else np.zeros(7, np.int64) for p in prevs])
    before = np.empty_like(x)
    before[1:] = x[:-1]
    fs = starts[nonempty]
    before[fs] = prev_rows[nonempty]
    pred = np.ones(len(x), dtype=bool)  # the row has a predecessor
    pred[fs] = has_prev[nonempty]
    d = x - before
    vc = np.repeat(np.asarray(vcpus, dtype=np.int64), lens)
    mt = np.repeat(np.asarray(mem_total, dtype=np.int64), lens)
    ok = (d[:, T] > 0) | ~pred
    ok &= np.all(d[:, COUNTERS] >= 0, axis=1) | ~pred
    ok &= (d[:, CPU] <= vc * d[:, T]) | ~pred
    ok &= x[:, MEM] <= mt
    ok &= _sane(x)
    job_ok = np.ones(nj, dtype=bool)
    if len(x):
        job_ok[nonempty] = np.logical_and.reduceat(ok, fs)
    out = empty
    out.fast = job_ok
    for j in np.flatnonzero(~job_ok).tolist():
        out.slow[j] = clean(prevs[j], arrs[j], vcpus[j], mem_total[j])
    keep = job_ok[job]
    if not keep.all():
        x, d, before, pred, job, vc = (
            x[keep],
            d[keep],
            before[keep],
            pred[keep],
            job[keep],
            vc[keep],
        )
    # a series' first sample with no predecessor: whole counter values, no interval
    d[~pred, T] = 0
    before[~pred] = 0
    dt = d[:, T]
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(dt > 0, 100.0 * d[:, CPU] / (vc * np.maximum(dt, 1)), 0.0)
    out.job, out.rows, out.deltas = job, x, d
    out.cpu_percent = pct.astype(np.float32)
    out.before_mem = before[:, MEM]
    if not len(x):
        return out
    counted = (dt > 0) & (dt <= NS_PER_S)
    gap = dt > NS_PER_S
    hour = x[:, T] // NS_PER_HOUR
    brk = np.ones(len(x), dtype=bool)
    brk[1:] = (hour[1:] != hour[:-1]) | (job[1:] != job[:-1])
    gstarts = np.flatnonzero(brk)
    sums = np.add.reduceat(d[:, 1:], gstarts, axis=0).tolist()
    gap_ns = np.add.reduceat(np.where(gap, dt, 0), gstarts).tolist()
    gaps = np.add.reduceat(gap.astype(np.int64), gstarts).tolist()
    counts = np.diff(np.append(gstarts, len(x))).tolist()
    mem = _limb_sums(before[:, MEM], np.where(counted, dt, 0), gstarts)
    gjob = job[gstarts].tolist()
    ghour = hour[gstarts].tolist()
    for g in range(len(gstarts)):
        row = sums[g]
        out.hours[gjob[g]][int(ghour[g])] = HourUsage(
            cpu_ns=int(row[0]),
            mem_byte_ns=mem[g],
            net_rx_bytes=int(row[2]),
            net_tx_bytes=int(row[3]),
            disk_read_bytes=int(row[4]),
            disk_write_bytes=int(row[5]),
            gap_ns=int(gap_ns[g]),
            gaps=int(gaps[g]),
            samples=int(counts[g]),
        )
    ends = np.flatnonzero(np.append(job[1:] != job[:-1], True))
    for e in ends.tolist():
        out.last[int(job[e])] = x[e].copy()
    return out
