"""billaged's durable state on disk: spooled batches and each series' next sequence number.

Layout under the spool dir::

    segments/<n>.spool   encoded batches waiting for their JetStream ack, one file per flush
                         (records: u32 length, u32 crc32, batch bytes); written to a temp file,
                         fsync'd, renamed, directory fsync'd. Deleted once every batch in it
                         was acked.
    seq.log              JSON lines {"s": "<vm>:<instance>", "n": next_seq, "t": last_t,
                         "closed": bool, "closed_at": ns}, last line per series wins;
                         fsync'd before any segment is deleted (until then the segments
                         themselves carry the seqs).
                         So a batch id is never reused for different samples after a restart.
    journal/             the sample journal (:mod:`.journal`)

A batch is only ever deleted after its ack; after a crash every segment left is published again
(in order) and JetStream's duplicate window (``Nats-Msg-Id``) drops the copies it already has.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core import log as ulog
from .codec import InvalidBatch, decode_array

_REC = struct.Struct("<II")
FORGET_CLOSED_AFTER_NS = 2 * 24 * 3600 * 10**9
log = ulog.get(__name__)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    customer_id: str
    batch_id: str
    samples: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SeriesState:
    next_seq: int
    last_t: int
    closed: bool = False
    closed_at_ns: int = 0  # wall time when it was closed (for forgetting it later)


@dataclass(frozen=True, slots=True)
class _Entry:
    """Where a spooled batch sits in its segment file: batches are not kept in memory, so a
    long NATS outage grows the disk, not billaged's RSS."""

    customer_id: str
    batch_id: str
    samples: int
    offset: int
    length: int


def series_name(vm_id: str, instance_id: str) -> str:
    return f"{vm_id}:{instance_id}"


class Spool:
    """Spooled batches in order, with in-memory ack tracking per segment."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.seg_dir = self.root / "segments"
        self.seg_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.seg_dir.glob("*.tmp"):
            tmp.unlink()  # a flush that never got renamed: its samples are still in the journal
        self._segments: dict[int, list[_Entry]] = {}
        self._acked: dict[int, set[int]] = {}
        self.series: dict[str, SeriesState] = {}
        self._seq_log_path = self.root / "seq.log"
        self._load()
        self._seq_log = open(self._seq_log_path, "ab")  # noqa: SIM115 - lives as long as the spool
        self._seq_dirty = False
        names = sorted(self._segments)
        self._next_segment = (names[-1] + 1) if names else 0

    # -- recovery -------------------------------------------------------------------------
    def _load(self) -> None:
        if self._seq_log_path.exists():
            for line in self._seq_log_path.read_bytes().splitlines():
                try:
                    rec = json.loads(line)
                    self.series[rec["s"]] = SeriesState(
                        int(rec["n"]),
                        int(rec["t"]),
                        bool(rec.get("closed", False)),
                        int(rec.get("closed_at", 0)),
                    )
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a crash mid-append
        for path in sorted(self.seg_dir.glob("*.spool")):
            n = int(path.stem)
            read = list(self._read_segment(path))
            if not path.exists():
                continue  # moved aside as <n>.corrupt for a person to inspect
            self._segments[n] = [e for e, _ in read]
            self._acked[n] = set()
            # A segment renamed but whose seq.log append was lost still fixes the seqs.
            for item, t_last in read:
                vm, inst, seq = item.batch_id.rsplit(":", 2)
                name = series_name(vm, inst)
                st = self.series.get(name)
                if st is None or st.next_seq <= int(seq):
                    self.series[name] = SeriesState(int(seq) + 1, int(t_last))
        # Compact: one line per series. Stopped series are kept for FORGET_CLOSED_AFTER_NS
        # (their journal records are long gone by then), so a replay never reopens them.
        horizon = time.time_ns() - FORGET_CLOSED_AFTER_NS
        keep = {n: s for n, s in self.series.items() if not (s.closed and s.closed_at_ns < horizon)}
        atomic_write(self._seq_log_path, b"".join(self._seq_line(n, s) for n, s in keep.items()))
        self.series = keep

    def _read_segment(self, path: Path) -> Iterator[tuple[_Entry, int]]:
        data = path.read_bytes()
        off = 0
        while off < len(data):
            ln, crc = _REC.unpack_from(data, off) if off + _REC.size <= len(data) else (-1, 0)
            off += _REC.size
            start = off
            body = data[off : off + ln] if ln >= 0 else b""
            off += max(ln, 0)
            if ln < 0 or len(body) != ln or zlib.crc32(body) != crc:
                # Segments are fsync'd before rename, so this is disk corruption: keep the file
                # aside for a person, never delete it silently.
                bad = path.with_suffix(".corrupt")
                path.replace(bad)
                ulog.event(log, "spool segment corrupt, moved aside", logging.ERROR, path=str(bad))
                return
            try:
                d = decode_array(body)
            except InvalidBatch as exc:
                ulog.event(
                    log,
                    "spooled batch invalid, skipped",
                    logging.ERROR,
                    path=str(path),
                    error=str(exc),
                )
                continue
            entry = _Entry(d.key.customer_id, d.batch_id, int(d.samples.shape[0]), start, ln)
            yield entry, int(d.samples[-1, 0])

    @staticmethod
    def _seq_line(name: str, st: SeriesState) -> bytes:
        rec = {"s": name, "n": st.next_seq, "t": st.last_t}
        if st.closed:
            rec["closed"] = True
            rec["closed_at"] = st.closed_at_ns
        return json.dumps(rec, separators=(",", ":")).encode() + b"\n"

    # -- writing --------------------------------------------------------------------------
    def write(self, items: list[SpooledBatch], states: dict[str, SeriesState]) -> int:
        """Durably spool ``items`` as one segment, then record the series' new states.
        Returns the segment number."""
        n = self._next_segment
        self._next_segment += 1
        if items:
            parts = []
            entries = []
            off = 0
            for it in items:
                parts.append(_REC.pack(len(it.data), zlib.crc32(it.data)))
                parts.append(it.data)
                off += _REC.size
                entries.append(_Entry(it.customer_id, it.batch_id, it.samples, off, len(it.data)))
                off += len(it.data)
            atomic_write(self.seg_dir / f"{n:012d}.spool", b"".join(parts))
            self._segments[n] = entries
            self._acked[n] = set()
        self.update_series(states)
        return n

    def update_series(self, states: dict[str, SeriesState]) -> None:
        if not states:
            return
        self.series.update(states)
        self._seq_log.write(b"".join(self._seq_line(k, v) for k, v in states.items()))
        self._seq_log.flush()
        # Not fsync'd here: until the segment carrying these batches is deleted, the segment
        # itself tells recovery the seqs (see _load); ack() syncs seq.log before any delete.
        self._seq_dirty = True

    def _sync_seq_log(self) -> None:
        if self._seq_dirty:
            os.fsync(self._seq_log.fileno())
            self._seq_dirty = False

    # -- publishing -----------------------------------------------------------------------
    def pending(self, limit: int) -> list[tuple[int, int, SpooledBatch]]:
        """Up to ``limit`` unacked batches, oldest segment first."""
        out: list[tuple[int, int, SpooledBatch]] = []
        for n in sorted(self._segments):
            acked = self._acked[n]
            todo = [(i, e) for i, e in enumerate(self._segments[n]) if i not in acked]
            if not todo:
                continue
            fd = os.open(self.seg_dir / f"{n:012d}.spool", os.O_RDONLY | os.O_CLOEXEC)
            try:
                for i, e in todo:
                    data = os.pread(fd, e.length, e.offset)
                    out.append((n, i, SpooledBatch(e.customer_id, e.batch_id, e.samples, data)))
                    if len(out) >= limit:
                        return out
            finally:
                os.close(fd)
        return out

    def ack(self, segment: int, index: int) -> None:
        """The batch is stored by JetStream; delete its segment once all its batches are."""
        if segment not in self._segments:
            return
        self._acked[segment].add(index)
        if len(self._acked[segment]) == len(self._segments[segment]):
            self._sync_seq_log()
            (self.seg_dir / f"{segment:012d}.spool").unlink(missing_ok=True)
            del self._segments[segment]
            del self._acked[segment]

    @property
    def pending_count(self) -> int:
        return sum(len(v) - len(self._acked[k]) for k, v in self._segments.items())

    def close(self) -> None:
        self._sync_seq_log()
        self._seq_log.close()
