"""The sample journal: every accepted sample is appended here before it sits in billaged's
60-second in-memory buffer, so a billaged killed with SIGKILL loses nothing it had accepted.

One write per tick (all series' samples together), no fsync per write: the page cache keeps it
across a process crash; a host crash may lose up to ``fsync_interval_s`` of samples (the
counters are cumulative, so the next batch still carries the usage; only memory for that gap is
not billed, see BILLING.md). Segments rotate; a segment is deleted once no series still buffers
samples that were journaled in it.

Records: u32 payload length, u32 crc32(payload), u8 type, payload::

    SERIES  u32 slot, JSON SeriesKey         (slots are scoped to the segment's records)
    SAMPLES u32 n, u32 slot[n], i64 rows[n][7]
    STOP    u32 slot
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .codec import NCOLS, Samples
from .model import SeriesKey

_HDR = struct.Struct("<IIB")
_U32 = struct.Struct("<I")
SERIES, SAMPLES, STOP = 1, 2, 3

Record = (
    tuple[int, int, SeriesKey]
    | tuple[int, np.ndarray, Samples]  # (SAMPLES, slots, rows)
    | tuple[int, int, None]
)


class Journal:
    def __init__(self, directory: Path, fsync_interval_s: float = 1.0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync_interval_s = fsync_interval_s
        self._fd: int | None = None
        self._last_fsync = time.monotonic()
        segs = self.segments()
        self.current = (segs[-1] + 1) if segs else 0

    def segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob("*.wal"))

    def _path(self, n: int) -> Path:
        return self.dir / f"{n:012d}.wal"

    # -- reading ----------------------------------------------------------------------------
    def replay(self) -> Iterator[tuple[int, Record]]:
        """Every intact record of every segment, in order, as (segment, record). A torn tail
        (the process died mid-write) ends that segment's replay."""
        for n in self.segments():
            data = self._path(n).read_bytes()
            off = 0
            while off + _HDR.size <= len(data):
                ln, crc, typ = _HDR.unpack_from(data, off)
                body = data[off + _HDR.size : off + _HDR.size + ln]
                if len(body) != ln or zlib.crc32(body) != crc:
                    break
                off += _HDR.size + ln
                (slot_or_n,) = _U32.unpack_from(body, 0)
                if typ == SERIES:
                    key = SeriesKey(**json.loads(body[4:]))
                    yield n, (SERIES, slot_or_n, key)
                elif typ == SAMPLES:
                    cnt = slot_or_n
                    slots = np.frombuffer(body, dtype="<u4", count=cnt, offset=4).astype(np.int64)
                    rows = np.frombuffer(body, dtype="<i8", offset=4 + 4 * cnt).reshape(cnt, NCOLS)
                    yield n, (SAMPLES, slots, rows.astype(np.int64))
                elif typ == STOP:
                    yield n, (STOP, slot_or_n, None)

    # -- writing ----------------------------------------------------------------------------
    def _append(self, typ: int, payload: bytes) -> None:
        if self._fd is None:
            raise RuntimeError("journal segment not started")
        rec = _HDR.pack(len(payload), zlib.crc32(payload), typ) + payload
        view = memoryview(rec)
        while view:
            view = view[os.write(self._fd, view) :]
        now = time.monotonic()
        if now - self._last_fsync >= self.fsync_interval_s:
            os.fdatasync(self._fd)
            self._last_fsync = now

    def start_segment(self) -> int:
        """Open a new segment (the caller then re-registers its live series in it)."""
        if self._fd is not None:
            os.fdatasync(self._fd)
            os.close(self._fd)
        self.current += 1
        self._fd = os.open(self._path(self.current), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return self.current

    def series(self, slot: int, key: SeriesKey) -> None:
        self._append(SERIES, _U32.pack(slot) + json.dumps(asdict(key)).encode())

    def samples(self, slots: np.ndarray, rows: Samples) -> None:
        n = len(slots)
        payload = (
            _U32.pack(n)
            + np.asarray(slots, dtype="<u4").tobytes()
            + np.ascontiguousarray(rows, dtype="<i8").tobytes()
        )
        self._append(SAMPLES, payload)

    def stop(self, slot: int) -> None:
        self._append(STOP, _U32.pack(slot))

    def delete_before(self, n: int) -> None:
        """Drop segments older than ``n`` (their samples are all spooled)."""
        for s in self.segments():
            if s < n and s != self.current:
                self._path(s).unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = None
