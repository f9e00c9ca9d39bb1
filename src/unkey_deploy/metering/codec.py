"""The wire format of one metering batch (format version 1), with a strict decoder.

Layout, all integers little-endian::

    header   "<4sHHQqqIIQ"  magic b"UKMB", version u16, flags u16 (0), seq u64,
                            t_first i64, t_last i64, count u32, vcpus u32, memory_total u64
    ids      3 x (u16 length + UTF-8): customer_id, vm_id, instance_id
    lengths  "<II"          raw body length (= count * 7 * 8), compressed body length
    body     one zstd frame (with content size and checksum) of the columns

The body is columnar: the 7 columns of :class:`~unkey_deploy.metering.model.Sample` in field
order (t, cpu_time_ns, memory_used_bytes, net_rx, net_tx, disk_read, disk_write), each as int64
with the first value absolute and the rest as deltas from the previous sample, and the bytes of
each column transposed (all byte 0s, then all byte 1s, ...) so that zstd sees the long runs of
zero high bytes. On this machine that is ~4:1 (see bench/metering.py), against ~2.6:1 for the
row layout of the design.

:func:`decode` rejects anything that is not exactly a valid batch and names what is wrong
(``decode_array(data, strict=False)`` rejects only structural faults, see there):
bad magic, unknown version, bad or inconsistent lengths, truncation or trailing bytes, a corrupt
body, time not strictly increasing, a counter going down (a negative delta), a negative value,
memory above the allocation, a header that disagrees with the body.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import zstandard

from ..core.errors import Problem, ValidationFailed
from .model import Batch, Sample, SeriesKey

MAGIC = b"UKMB"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
COLUMNS = (
    "t",
    "cpu_time_ns",
    "memory_used_bytes",
    "net_rx_bytes",
    "net_tx_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
)
NCOLS = len(COLUMNS)
MEMORY_COL = 2
COUNTER_COLS = (1, 3, 4, 5, 6)
# A batch is at most this many samples: 600 is the default (60 s at 10 Hz); the cap only bounds
# what a decoder will allocate for a hostile message.
MAX_SAMPLES = 65_536
MAX_ID_LEN = 128
# The header carries vcpus as u32, but every store of it is 16 bits (metrics_raw.vcpus and the
# rollups' vcpus_max are UInt16): more is no real VM, and would not fit where it is written.
MAX_VCPUS = 0xFFFF
# Ids travel in NATS subjects and in the batch id "<vm>:<instance>:<seq>".
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

_HEAD = struct.Struct("<4sHHQqqIIQ")
_LEN16 = struct.Struct("<H")
_LENS = struct.Struct("<II")

Samples = npt.NDArray[np.int64]
"""An ``(n, 7)`` int64 array, one row per sample, columns in :data:`COLUMNS` order."""


class InvalidBatch(ValidationFailed):
    """A metering batch that is not exactly a valid batch; ``problems`` say what is wrong.

    Not retryable: a consumer should ``term`` the message (and keep it for inspection)."""


def _fail(loc: str, msg: str) -> InvalidBatch:
    return InvalidBatch(f"invalid metering batch: {loc}: {msg}", [Problem(loc=loc, msg=msg)])


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A decoded batch as arrays, for consumers that aggregate with numpy."""

    key: SeriesKey
    seq: int
    samples: Samples

    @property
    def batch_id(self) -> str:
        return f"{self.key.vm_id}:{self.key.instance_id}:{self.seq}"

    def to_batch(self) -> Batch:
        rows = self.samples.tolist()
        return Batch(key=self.key, seq=self.seq, samples=tuple(Sample(*r) for r in rows))


def samples_to_array(samples: Sequence[Sample]) -> Samples:
    return np.array(
        [
            (
                s.t,
                s.cpu_time_ns,
                s.memory_used_bytes,
                s.net_rx_bytes,
                s.net_tx_bytes,
                s.disk_read_bytes,
                s.disk_write_bytes,
            )
            for s in samples
        ],
        dtype=np.int64,
    ).reshape(-1, NCOLS)


def check_key(key: SeriesKey) -> list[Problem]:
    problems = []
    for name in ("customer_id", "vm_id", "instance_id"):
        value = getattr(key, name)
        if not isinstance(value, str) or not ID_RE.match(value):
            problems.append(
                Problem(loc=name, msg=f"must be 1-128 of [A-Za-z0-9_-], got {value!r:.80}")
            )
    if not 1 <= key.vcpus <= MAX_VCPUS:
        problems.append(Problem(loc="vcpus", msg=f"must be 1..{MAX_VCPUS}, got {key.vcpus}"))
    if not 1 <= key.memory_total_bytes < 2**63:
        problems.append(
            Problem(loc="memory_total_bytes", msg=f"must be >= 1, got {key.memory_total_bytes}")
        )
    return problems


def check_samples(arr: Samples, memory_total: int) -> list[Problem]:
    """Everything that makes a batch body impossible, as problems (empty when valid)."""
    problems: list[Problem] = []
    n = arr.shape[0]
    if n == 0:
        return [Problem(loc="count", msg="a batch has at least one sample")]
    if n > MAX_SAMPLES:
        problems.append(Problem(loc="count", msg=f"{n} samples, at most {MAX_SAMPLES}"))
    t = arr[:, 0]
    if t[0] <= 0:
        problems.append(Problem(loc="t[0]", msg=f"timestamp must be positive, got {int(t[0])}"))
    if n > 1:
        bad = np.flatnonzero(np.diff(t) <= 0)
        if bad.size:
            i = int(bad[0]) + 1
            problems.append(
                Problem(
                    loc=f"t[{i}]",
                    msg=f"time not strictly increasing ({int(t[i - 1])} then {int(t[i])})",
                )
            )
    for c in COUNTER_COLS:
        col = arr[:, c]
        if col[0] < 0:
            problems.append(Problem(loc=f"{COLUMNS[c]}[0]", msg=f"negative value {int(col[0])}"))
        if n > 1:
            bad = np.flatnonzero(np.diff(col) < 0)
            if bad.size:
                i = int(bad[0]) + 1
                problems.append(
                    Problem(
                        loc=f"{COLUMNS[c]}[{i}]",
                        msg=f"cumulative counter went down ({int(col[i - 1])} then {int(col[i])})",
                    )
                )
    mem = arr[:, MEMORY_COL]
    bad = np.flatnonzero((mem < 0) | (mem > memory_total))
    if bad.size:
        i = int(bad[0])
        problems.append(
            Problem(
                loc=f"memory_used_bytes[{i}]",
                msg=f"{int(mem[i])} outside 0..memory_total_bytes ({memory_total})",
            )
        )
    return problems


def _shuffle(arr: Samples) -> bytes:
    """Delta-encode each column and transpose its bytes (see the module docstring)."""
    n = arr.shape[0]
    d = np.empty((NCOLS, n), dtype="<i8")
    d[:, 0] = arr[0]
    np.subtract(arr[1:].T, arr[:-1].T, out=d[:, 1:])
    return d.view(np.uint8).reshape(NCOLS, n, 8).transpose(0, 2, 1).tobytes()


def _unshuffle(raw: bytes, n: int) -> Samples:
    b = np.frombuffer(raw, dtype=np.uint8).reshape(NCOLS, 8, n).transpose(0, 2, 1)
    d = np.ascontiguousarray(b).view("<i8").reshape(NCOLS, n)
    with np.errstate(over="ignore"):
        out: Samples = np.cumsum(d, axis=1, dtype=np.int64).T.copy()
    return out


class Encoder:
    """Encodes batches; holds one zstd compressor (not thread-safe: one per thread)."""

    def __init__(self, level: int = 3) -> None:
        self._zc = zstandard.ZstdCompressor(level=level, write_checksum=True)

    def encode_array(self, key: SeriesKey, seq: int, arr: Samples, *, check: bool = True) -> bytes:
        """Encode ``arr`` ((n, 7) int64) as batch ``seq`` of series ``key``.

        Raises :class:`InvalidBatch` for data the decoder would reject, so a bad sample is caught
        where it was made, not by the billing consumer."""
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] != NCOLS:
            raise _fail("samples", f"expected shape (n, {NCOLS}), got {arr.shape}")
        if check:
            problems = check_key(key) + check_samples(arr, key.memory_total_bytes)
            if not 0 <= seq < 2**64:
                problems.append(Problem(loc="seq", msg=f"must be 0..2^64-1, got {seq}"))
            if problems:
                raise InvalidBatch(
                    f"refusing to encode batch {key.vm_id}:{key.instance_id}:{seq}: "
                    + "; ".join(p.render() for p in problems),
                    problems,
                )
        n = arr.shape[0]
        body = self._zc.compress(_shuffle(arr))
        parts = [
            _HEAD.pack(
                MAGIC,
                FORMAT_VERSION,
                0,
                seq,
                int(arr[0, 0]),
                int(arr[-1, 0]),
                n,
                key.vcpus,
                key.memory_total_bytes,
            )
        ]
        for s in (key.customer_id, key.vm_id, key.instance_id):
            b = s.encode()
            parts.append(_LEN16.pack(len(b)))
            parts.append(b)
        parts.append(_LENS.pack(n * NCOLS * 8, len(body)))
        parts.append(body)
        return b"".join(parts)

    def encode(self, batch: Batch) -> bytes:
        return self.encode_array(batch.key, batch.seq, samples_to_array(batch.samples))


def encode(batch: Batch) -> bytes:
    """Encode one batch (format version 1). For many batches keep one :class:`Encoder`."""
    return Encoder().encode(batch)


@dataclass(frozen=True, slots=True)
class _Header:
    key: SeriesKey
    seq: int
    count: int
    t_first: int
    t_last: int
    raw_len: int
    body_at: int


def _parse_header(data: bytes) -> _Header:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail("message", f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEAD.size:
        raise _fail("header", f"truncated: {len(data)} bytes, the header alone is {_HEAD.size}")
    magic, version, flags, seq, t_first, t_last, count, vcpus, mem_total = _HEAD.unpack_from(
        data, 0
    )
    if magic != MAGIC:
        raise _fail("magic", f"expected {MAGIC!r}, got {magic!r} (not a metering batch)")
    if version not in SUPPORTED_VERSIONS:
        raise _fail(
            "version",
            f"unknown format version {version} (this decoder reads {sorted(SUPPORTED_VERSIONS)})",
        )
    if flags != 0:
        raise _fail("flags", f"unknown flags {flags:#x}")
    off = _HEAD.size
    ids: list[str] = []
    for name in ("customer_id", "vm_id", "instance_id"):
        if off + 2 > len(data):
            raise _fail(name, "truncated before its length")
        (ln,) = _LEN16.unpack_from(data, off)
        off += 2
        if ln == 0 or ln > MAX_ID_LEN:
            raise _fail(name, f"bad length {ln} (1..{MAX_ID_LEN})")
        if off + ln > len(data):
            raise _fail(name, f"truncated: length {ln} but {len(data) - off} bytes left")
        try:
            ids.append(data[off : off + ln].decode())
        except UnicodeDecodeError as exc:
            raise _fail(name, f"not UTF-8: {exc}") from None
        off += ln
    if off + _LENS.size > len(data):
        raise _fail("lengths", "truncated before the body lengths")
    raw_len, body_len = _LENS.unpack_from(data, off)
    off += _LENS.size
    if count == 0 or count > MAX_SAMPLES:
        raise _fail("count", f"sample count {count} outside 1..{MAX_SAMPLES}")
    if raw_len != count * NCOLS * 8:
        raise _fail("raw_length", f"{raw_len} does not match {count} samples x {NCOLS} x 8")
    if off + body_len != len(data):
        what = "truncated" if off + body_len > len(data) else "trailing bytes"
        raise _fail(
            "body_length", f"{what}: header says {body_len} body bytes, {len(data) - off} present"
        )
    key = SeriesKey(
        customer_id=ids[0],
        vm_id=ids[1],
        instance_id=ids[2],
        vcpus=vcpus,
        memory_total_bytes=mem_total,
    )
    problems = check_key(key)
    if problems:
        raise InvalidBatch("invalid metering batch: " + problems[0].render(), problems)
    return _Header(key, seq, count, t_first, t_last, raw_len, off)


def read_key(data: bytes) -> tuple[SeriesKey, int]:
    """The series and seq of a batch from its header alone (the body is not read): to file a
    batch whose body is broken under its series. Raises :class:`InvalidBatch` like
    :func:`decode_array` when the header itself is broken."""
    h = _parse_header(data)
    return h.key, h.seq


def decode_array(data: bytes, *, strict: bool = True) -> DecodedBatch:
    """Decode and validate a batch into arrays. Raises :class:`InvalidBatch` naming the fault.

    ``strict=False`` is for the billing aggregator: a batch that is structurally sound (header,
    version, ids, lengths, zstd body, time range in the header) is returned even when some of
    its samples are invalid (time not increasing or repeated, a counter going down, a negative
    value, memory above the allocation). BILLING.md quarantines such samples one by one and bills
    the rest, so the caller must clean them (``billing.usage.clean`` does, with a reason each)."""
    h = _parse_header(data)
    data = bytes(data)
    key, seq, count, t_first, t_last = h.key, h.seq, h.count, h.t_first, h.t_last
    raw_len, off, mem_total = h.raw_len, h.body_at, h.key.memory_total_bytes
    try:
        params = zstandard.get_frame_parameters(data[off:])
        if params.content_size != raw_len:
            raise _fail("body", f"zstd frame holds {params.content_size} bytes, expected {raw_len}")
        raw = zstandard.ZstdDecompressor().decompress(data[off:], max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise _fail("body", f"corrupt zstd body: {exc}") from None
    if len(raw) != raw_len:
        raise _fail("body", f"decompressed to {len(raw)} bytes, expected {raw_len}")
    arr = _unshuffle(raw, count)
    problems = check_samples(arr, mem_total) if strict else []
    if arr[0, 0] != t_first or arr[-1, 0] != t_last:
        problems.append(
            Problem(
                loc="time_range",
                msg=f"header says {t_first}..{t_last}, samples say {arr[0, 0]}..{arr[-1, 0]}",
            )
        )
    if problems:
        raise InvalidBatch(
            f"invalid metering batch {key.vm_id}:{key.instance_id}:{seq}: "
            + "; ".join(p.render() for p in problems),
            problems,
        )
    return DecodedBatch(key=key, seq=seq, samples=arr)


def decode(data: bytes) -> Batch:
    """Decode and validate one batch. Raises :class:`InvalidBatch` (a ``ValidationFailed``, so
    an ``InvalidInput``) whose message and ``problems`` name what is wrong."""
    return decode_array(data).to_batch()


def peek_header(data: bytes) -> tuple[SeriesKey, int, int]:
    """(key, seq, count) from a batch header without touching the body (spool recovery)."""
    d = decode_array(data)
    return d.key, d.seq, int(d.samples.shape[0])
