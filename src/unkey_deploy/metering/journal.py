"""The sample journal: every accepted sample is appended here before it sits in billaged's
60-second in-memory buffer, so a billaged killed with SIGKILL loses nothing it had accepted.

One write per tick (all series' samples together), no fsync per write: the page cache keeps it
across a process crash; a background thread fdatasyncs it every ``fsync_interval_s``, so a host
crash may lose up to that much of samples (the
counters are cumulative, so the next batch still carries the usage; only memory for that gap is
not billed, see BILLING.md). Segments rotate; a segment is deleted once no series still buffers
samples that were journaled in it.

Records: u32 payload length, u32 crc32(payload), u8 type, payload::

    SERIES  u32 slot, JSON SeriesKey         (slots are scoped to the segment's records)
    SAMPLES u32 n, u32 slot[n], i64 rows[n][7]
    STOP    u32 slot
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
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
        self._key_cache: dict[SeriesKey, bytes] = {}
        segs = self.segments()
        self.current = (segs[-1] + 1) if segs else 0
        # fdatasync runs on a background thread (it releases the GIL): at 100k VMs a second of
        # journal is ~60 MB, and syncing it inline would stall sampling for 100+ ms.
        self._lock = threading.Lock()
        self._retired: list[int] = []
        self._stop = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="journal-sync", daemon=True)
        self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            self._sync_once()

    def _sync_once(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
            cur = os.dup(self._fd) if self._fd is not None else None
        for fd in [*retired, *([cur] if cur is not None else [])]:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.close(fd)

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
    def _append(self, typ: int, *parts: bytes | np.ndarray) -> None:
        """One record from ``parts`` without joining them (a tick at 100k VMs is ~6 MB)."""
        if self._fd is None:
            raise RuntimeError("journal segment not started")
        views = [(memoryview(p) if isinstance(p, bytes) else p.data).cast("B") for p in parts]
        crc = 0
        for v in views:
            crc = zlib.crc32(v, crc)
        bufs = [memoryview(_HDR.pack(sum(len(v) for v in views), crc, typ)), *views]
        total = sum(len(b) for b in bufs)
        written = os.writev(self._fd, bufs)
        if written < total:  # a short write: finish it byte-exact (rare, large records)
            rest = memoryview(b"".join(bytes(b) for b in bufs))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]

    def start_segment(self) -> int:
        """Open a new segment (the caller then re-registers its live series in it)."""
        new = os.open(self._path(self.current + 1), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with self._lock:
            if self._fd is not None:
                self._retired.append(self._fd)  # synced and closed by the sync thread
            self._fd = new
            self.current += 1
        return self.current

    def _key_bytes(self, key: SeriesKey) -> bytes:
        # every rotation re-registers every live series: cache the encoded key
        enc = self._key_cache.get(key)
        if enc is None:
            if len(self._key_cache) > 1_000_000:
                self._key_cache.clear()
            enc = self._key_cache[key] = json.dumps(asdict(key)).encode()
        return enc

    def series(self, slot: int, key: SeriesKey) -> None:
        self._append(SERIES, _U32.pack(slot), self._key_bytes(key))

    def series_many(self, items: list[tuple[int, SeriesKey]]) -> None:
        """Many SERIES records in one write (a rotation re-registers every live series)."""
        if self._fd is None:
            raise RuntimeError("journal segment not started")
        parts = []
        for slot, key in items:
            payload = _U32.pack(slot) + self._key_bytes(key)
            parts.append(_HDR.pack(len(payload), zlib.crc32(payload), SERIES))
            parts.append(payload)
        view = memoryview(b"".join(parts))
        while view:
            view = view[os.write(self._fd, view) :]

    def samples(self, slots: np.ndarray, rows: Samples) -> None:
        self._append(
            SAMPLES,
            _U32.pack(len(slots)),
            np.ascontiguousarray(slots, dtype="<u4"),
            np.ascontiguousarray(rows, dtype="<i8"),
        )

    def stop(self, slot: int) -> None:
        self._append(STOP, _U32.pack(slot))

    def delete_before(self, n: int) -> None:
        """Drop segments older than ``n`` (their samples are all spooled)."""
        for s in self.segments():
            if s < n and s != self.current:
                self._path(s).unlink(missing_ok=True)

    def close(self) -> None:
        self._stop.set()
        self._syncer.join()
        with self._lock:
            if self._fd is not None:
                self._retired.append(self._fd)
                self._fd = None
        self._sync_once()
