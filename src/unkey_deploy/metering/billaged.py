"""billaged: buffers each VM instance's 100 ms samples into 600-sample batches, spools them to
disk and publishes them to JetStream, losing nothing.

Path of a sample::

    ingest() ──> journal (append, one write per tick) ──> in-memory buffer (per series)
      600 samples, or the VM stopped ──> encode (codec v1) ──> spool segment (fsync, rename)
      ──> seq.log (next seq, fsync) ──> publisher: JetStream publish, Nats-Msg-Id = batch id
      ──> PubAck ──> segment deleted

- kill -9 at any point: the journal gives back the buffered samples, the spool the batches not
  yet acked (published again; JetStream drops the copies by ``Nats-Msg-Id``), seq.log the next
  seq of every series, so a batch id never names two different sets of samples.
- NATS down: ingest keeps journaling and spooling; the publisher retries and drains the spool
  oldest first when NATS is back.
- Samples that break the series' invariants (time not increasing, a counter going down, memory
  outside 0..allocation) are rejected at ingest and counted in ``rejected``, so a batch that
  reaches the spool always decodes.

Series live in *slots* (rows of numpy arrays) so that a tick of many VMs is a few vectorised
operations: :meth:`Billaged.ingest` takes slot indices and an ``(n, 7)`` array.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bus.interface import Bus
from ..core import log as ulog
from ..core import metrics
from ..core.config import BusConfig
from ..core.errors import InvalidInput, Unavailable, UnkeyError
from . import stream as mstream
from .codec import COUNTER_COLS, MAX_SAMPLES, MEMORY_COL, NCOLS, Encoder, Samples, check_key
from .journal import SAMPLES, SERIES, STOP, Journal
from .model import SeriesKey
from .spool import SeriesState, Spool, SpooledBatch, series_name

log = ulog.get(__name__)
_COUNTERS = np.array(COUNTER_COLS)

BusFactory = Callable[[], Awaitable[Bus]]


@dataclass
class Stats:
    accepted: int = 0
    rejected: int = 0
    batches_spooled: int = 0
    batches_published: int = 0
    duplicates: int = 0
    publish_errors: int = 0
    bytes_published: int = 0
    samples_published: int = 0


class Billaged:
    """One billaged. Not thread-safe: call it from one event loop."""

    def __init__(
        self,
        spool_dir: Path,
        *,
        bus_factory: BusFactory | None = None,
        bus_config: BusConfig | None = None,
        batch_samples: int = 600,
        zstd_level: int = 3,
        journal: bool = True,
        rotate_ticks: int = 600,
        publish_chunk: int = 2000,
        capacity: int = 16,
    ) -> None:
        if not 1 <= batch_samples <= MAX_SAMPLES:
            # a bigger batch is encoded, but every decoder (the aggregator's, the spool's)
            # rejects it: all its usage would be quarantined, never billed
            raise InvalidInput(
                f"billaged: batch_samples must be 1..{MAX_SAMPLES} (the batch format's limit), "
                f"got {batch_samples}"
            )
        self.spool_dir = Path(spool_dir)
        self.batch_samples = batch_samples
        self.bus_config = bus_config or BusConfig()
        self._bus_factory = bus_factory
        self._bus: Bus | None = None
        self._stream_ok = False  # ensure_stream done since the last failed publish
        self._encoder = Encoder(zstd_level)
        self.spool = Spool(self.spool_dir)
        self._journal = Journal(self.spool_dir / "journal") if journal else None
        self.rotate_ticks = rotate_ticks
        self.publish_chunk = publish_chunk
        self.stats = Stats()
        self._ticks_in_segment = 0
        self._recovering = False
        self._wake = asyncio.Event()
        self._closing = False
        # slot arrays
        self._cap = 0
        self._keys: list[SeriesKey | None] = []
        self._slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self._buf = np.zeros((0, batch_samples, NCOLS), dtype=np.int64)
        self._fill = np.zeros(0, dtype=np.int64)
        self._last = np.zeros((0, NCOLS), dtype=np.int64)
        self._mem_total = np.zeros(0, dtype=np.int64)
        self._seq = np.zeros(0, dtype=np.int64)
        self._first_seg = np.zeros(0, dtype=np.int64)
        self._grow(capacity)  # growing copies the 600-sample buffers: size it up front
        self._recover()

    # -- slots ------------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = max(need, self._cap * 2, 16)
        old = self._cap

        def ext(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
            # np.zeros is calloc: untouched pages cost nothing until a series uses its slot
            out = np.zeros((cap, *shape), dtype=np.int64)
            out[:old] = a
            return out

        self._buf = ext(self._buf, (self.batch_samples, NCOLS))
        self._fill = ext(self._fill, ())
        self._last = ext(self._last, (NCOLS,))
        self._mem_total = ext(self._mem_total, ())
        self._seq = ext(self._seq, ())
        self._first_seg = ext(self._first_seg, ())
        self._keys.extend([None] * (cap - old))
        self._free.extend(range(cap - 1, old - 1, -1))
        self._cap = cap

    def slot(self, key: SeriesKey) -> int:
        """The slot of ``key``'s series, registering it on first use."""
        name = series_name(key.vm_id, key.instance_id)
        s = self._slot_of.get(name)
        if s is not None:
            if self._keys[s] != key:
                raise InvalidInput(f"series {name} re-registered with a different key")
            return s
        problems = check_key(key)
        if problems:
            raise InvalidInput("billaged: bad series key: " + problems[0].render())
        st = self.spool.series.get(name)
        if st is not None and st.closed:
            raise InvalidInput(f"series {name} was stopped; a restart is a new instance id")
        if not self._free:
            self._grow(self._cap + 1)
        s = self._free.pop()
        self._keys[s] = key
        self._slot_of[name] = s
        self._fill[s] = 0
        self._last[s] = 0
        self._last[s, 0] = st.last_t if st else 0
        self._mem_total[s] = key.memory_total_bytes
        self._seq[s] = st.next_seq if st else 0
        self._first_seg[s] = -1
        if self._journal is not None:
            self._journal.series(s, key)
        return s

    def last_t(self, key: SeriesKey) -> int:
        """Timestamp of the last sample accepted for ``key`` (0 if none): where a source that
        can replay (the simulator) resumes after a restart."""
        s = self._slot_of.get(series_name(key.vm_id, key.instance_id))
        if s is not None:
            return int(self._last[s, 0])
        st = self.spool.series.get(series_name(key.vm_id, key.instance_id))
        return st.last_t if st else 0

    @property
    def series_count(self) -> int:
        return len(self._slot_of)

    # -- ingest -----------------------------------------------------------------------------
    def ingest(self, slots: np.ndarray, rows: Samples) -> int:
        """Accept one tick: ``rows[i]`` is the next sample of the series in ``slots[i]``.
        Returns how many were accepted; the others are counted in ``stats.rejected``."""
        slots = np.asarray(slots, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape != (len(slots), NCOLS):
            raise InvalidInput(f"billaged: rows must be ({len(slots)}, {NCOLS}), got {rows.shape}")
        if len(slots) and (
            slots.min() < 0 or slots.max() >= self._cap or np.bincount(slots, minlength=1).max() > 1
        ):
            raise InvalidInput("billaged: unknown slot, or a series twice in one tick")
        last = self._last[slots]
        ok = rows[:, 0] > last[:, 0]
        ok &= (rows[:, _COUNTERS] >= last[:, _COUNTERS]).all(axis=1)
        ok &= (rows[:, _COUNTERS] >= 0).all(axis=1)
        mem = rows[:, MEMORY_COL]
        ok &= (mem >= 0) & (mem <= self._mem_total[slots])
        if not ok.all():
            bad = int((~ok).sum())
            self.stats.rejected += bad
            ulog.event(log, "samples rejected", logging.WARNING, count=bad)
            slots, rows = slots[ok], rows[ok]
        if not len(slots):
            return 0
        try:
            if self._journal is not None:
                if self._journal._fd is None or self._ticks_in_segment >= self.rotate_ticks:
                    self._rotate()
                self._journal.samples(slots, rows)
                self._ticks_in_segment += 1
                fill = self._fill[slots]
                starting = slots[fill == 0]
                self._first_seg[starting] = self._journal.current
            self._store(slots, rows)
        except OSError as exc:
            raise self._disk_error(exc) from exc
        return len(slots)

    def _disk_error(self, exc: OSError) -> Unavailable:
        """A write to the spool failed (disk full, I/O error). This billaged's in-memory state
        may be ahead of its files now: it must be restarted; what it accepted before is
        recovered from the journal and the spool (a torn last record is skipped)."""
        return Unavailable(
            f"billaged cannot write its spool {self.spool_dir}: {exc.strerror or exc}",
            suggestion="free space on that filesystem, then restart billaged (metald): "
            "it recovers every sample it accepted from the journal and spool",
            retryable=False,
        )

    def _store(self, slots: np.ndarray, rows: Samples) -> None:
        fill = self._fill[slots]
        self._buf[slots, fill] = rows
        self._last[slots] = rows
        self._fill[slots] = fill + 1
        self.stats.accepted += len(slots)
        metrics.SAMPLES_COLLECTED.inc(len(slots))
        full = slots[fill + 1 >= self.batch_samples]
        if len(full):
            self._flush(full)

    def ingest_one(self, key: SeriesKey, row: Samples) -> bool:
        s = self.slot(key)
        return self.ingest(np.array([s]), np.asarray(row, dtype=np.int64).reshape(1, NCOLS)) == 1

    def checkpoint(self, keys: Iterable[SeriesKey]) -> None:
        """Spool the partial batches of ``keys`` now, the series staying open: a metering loop
        that stops while its VMs keep running (metald restarting) publishes what it sampled,
        and the next one continues each series where this one left it (next seq, last
        sample). Unknown keys are ignored."""
        slots = [s for k in keys if (s := self._slot_of.get(series_name(k.vm_id, k.instance_id)))
                 is not None]  # fmt: skip
        if not slots:
            return
        try:
            self._flush(np.array(slots))
        except OSError as exc:
            raise self._disk_error(exc) from exc

    def stop(self, key: SeriesKey) -> None:
        """The VM instance stopped: flush its partial batch and retire the series."""
        name = series_name(key.vm_id, key.instance_id)
        s = self._slot_of.get(name)
        if s is None:
            return
        try:
            self._flush(np.array([s]), closing={s})
            if self._journal is not None:
                self._journal.stop(s)
        except OSError as exc:
            raise self._disk_error(exc) from exc
        del self._slot_of[name]
        self._keys[s] = None
        self._fill[s] = 0
        self._first_seg[s] = -1
        self._free.append(s)

    def _flush(self, slots: np.ndarray, closing: set[int] | None = None) -> None:
        items: list[SpooledBatch] = []
        states: dict[str, SeriesState] = {}
        for s in (int(x) for x in slots):
            key = self._key(s)
            n = int(self._fill[s])
            name = series_name(key.vm_id, key.instance_id)
            seq = int(self._seq[s])
            if n:
                arr = self._buf[s, :n]
                # ingest() already enforced every invariant the decoder checks
                data = self._encoder.encode_array(key, seq, arr, check=False)
                items.append(SpooledBatch(key.customer_id, f"{name}:{seq}", n, data))
                seq += 1
            closed = bool(closing and s in closing)
            states[name] = SeriesState(
                seq, int(self._last[s, 0]), closed, time.time_ns() if closed else 0
            )
        self.spool.write(items, states)
        self._seq[slots] = [states[series_name(*self._name_parts(int(s)))].next_seq for s in slots]
        self._fill[slots] = 0
        self._first_seg[slots] = -1
        self.stats.batches_spooled += len(items)
        metrics.SPOOL_DEPTH.set(self.spool.pending_count)
        self._wake.set()
        self._trim_journal()

    def _name_parts(self, s: int) -> tuple[str, str]:
        key = self._key(s)
        return key.vm_id, key.instance_id

    def _key(self, s: int) -> SeriesKey:
        key = self._keys[s]
        if key is None:
            raise RuntimeError(f"billaged: slot {s} is free")  # a bug, not an input error
        return key

    # -- journal ----------------------------------------------------------------------------
    def _rotate(self) -> None:
        if self._journal is None:
            return
        self._journal.start_segment()
        self._ticks_in_segment = 0
        self._journal.series_many([(s, self._key(s)) for s in self._slot_of.values()])
        self._trim_journal()

    def _trim_journal(self) -> None:
        if self._journal is None or self._recovering:
            return
        live = self._first_seg[: self._cap]
        live = live[live >= 0]
        oldest_needed = int(live.min()) if len(live) else self._journal.current
        self._journal.delete_before(min(oldest_needed, self._journal.current))

    def _recover(self) -> None:
        """Rebuild buffers from the journal; samples already in a spooled batch are skipped."""
        if self._journal is None:
            return
        local: dict[int, SeriesKey] = {}
        stopped: list[SeriesKey] = []
        recovered = 0
        self._recovering = True
        for _seg, rec in self._journal.replay():
            typ, a, b = rec
            if typ == SERIES and isinstance(a, int) and isinstance(b, SeriesKey):
                local[a] = b
            elif typ == STOP and isinstance(a, int):
                key2 = local.get(a)
                if key2 is not None:
                    stopped.append(key2)
            elif typ == SAMPLES and isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
                lslots, rows = a, b
                gslots, keep = [], []
                for i, ls in enumerate(lslots.tolist()):
                    key3 = local.get(ls)
                    if key3 is None:
                        continue
                    name = series_name(key3.vm_id, key3.instance_id)
                    st = self.spool.series.get(name)
                    if st is not None and st.closed:
                        continue
                    g = self._slot_of.get(name)
                    if g is None:
                        g = self._register_quiet(key3)
                    if rows[i, 0] <= self._last[g, 0]:
                        continue  # already in a spooled batch (or a replayed duplicate)
                    gslots.append(g)
                    keep.append(i)
                if keep:
                    self._store(np.array(gslots), rows[keep])
                    recovered += len(keep)
        self._recovering = False
        self.stats.accepted = 0
        # Re-journal what is still buffered into a fresh segment, then drop the old ones.
        self._journal.start_segment()
        self._ticks_in_segment = 0
        for key in stopped:
            if series_name(key.vm_id, key.instance_id) in self._slot_of:
                self.stop(key)
        for s in self._slot_of.values():
            self._journal.series(s, self._key(s))
            n = int(self._fill[s])
            if n:
                self._journal.samples(np.full(n, s), self._buf[s, :n])
                self._first_seg[s] = self._journal.current
        self._journal.delete_before(self._journal.current)
        if recovered:
            ulog.event(log, "billaged recovered buffered samples", samples=recovered)

    def _register_quiet(self, key: SeriesKey) -> int:
        journal, self._journal = self._journal, None
        try:
            return self.slot(key)
        finally:
            self._journal = journal

    # -- publishing -------------------------------------------------------------------------
    async def _connect(self) -> Bus | None:
        """The connection, with the stream ensured since the last failed round (NATS may come
        back without it: a new server, a lost store, a deleted stream). Kept across rounds
        once made: a connection whose stream cannot be made is kept too, never dropped open."""
        if self._bus is None:
            if self._bus_factory is None:
                return None
            try:
                self._bus = await self._bus_factory()
            except UnkeyError as exc:
                ulog.event(log, "bus not available, spooling", logging.WARNING, error=str(exc))
                return None
        if not self._stream_ok:
            try:
                await self._bus.ensure_stream(mstream.stream_spec(self.bus_config))
            except UnkeyError as exc:
                ulog.event(log, "stream not available, spooling", logging.WARNING, error=str(exc))
                return None
            self._stream_ok = True
        return self._bus

    async def publish_pending(self, timeout_s: float = 10.0) -> int:
        """One round: publish up to ``publish_chunk`` spooled batches, oldest first. Returns how
        many were stored by JetStream (new or duplicate)."""
        bus = await self._connect()
        if bus is None:
            return 0
        pending = self.spool.pending(self.publish_chunk)
        if not pending:
            return 0
        msgs = [
            mstream.batch_message(it.customer_id, it.batch_id, it.data, it.samples)
            for _, _, it in pending
        ]
        results = await bus.publish_many(msgs, timeout_s=timeout_s)
        done = 0
        for (seg, idx, it), res in zip(pending, results, strict=True):
            if isinstance(res, UnkeyError):
                self.stats.publish_errors += 1
                self._stream_ok = False  # the stream may be gone: ensure it next round
                continue
            self.spool.ack(seg, idx)
            done += 1
            self.stats.batches_published += 1
            self.stats.bytes_published += len(it.data)
            self.stats.samples_published += it.samples
            if res.duplicate:
                self.stats.duplicates += 1
        metrics.BATCHES_PUBLISHED.inc(done)
        metrics.SPOOL_DEPTH.set(self.spool.pending_count)
        return done

    async def run_publisher(self, idle_s: float = 0.5) -> None:
        """Publish forever (until :meth:`close`); back off while NATS is away."""
        backoff = 0.1
        while not self._closing:
            try:
                done = await self.publish_pending()
            except UnkeyError as exc:
                ulog.event(log, "publish round failed", logging.WARNING, error=str(exc))
                done = 0
            if self.spool.pending_count and done == 0:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            if not self.spool.pending_count:
                self._wake.clear()
                # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({waiter}, timeout=idle_s)
                finally:
                    waiter.cancel()

    def stop_publisher(self) -> None:
        """Make :meth:`run_publisher` return after its current round."""
        self._closing = True
        self._wake.set()

    async def drain(self, timeout_s: float = 60.0) -> bool:
        """Publish until the spool is empty; False if ``timeout_s`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.spool.pending_count:
            if loop.time() > deadline:
                return False
            if await self.publish_pending() == 0:
                await asyncio.sleep(0.1)
        return True

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._journal is not None:
            self._journal.close()
        self.spool.close()
        if self._bus is not None:
            await self._bus.close()
            self._bus = None
