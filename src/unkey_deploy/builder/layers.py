"""Layer applier: untrusted OCI layer tars -> a root directory, never writing outside it.

Why not ``tarfile.extractall(filter="data")``: real images hold absolute symlinks and setuid files,
which that filter rejects or rewrites. The rules here (see :func:`apply_layer`):

* entry names are made relative; any ``..`` component is rejected;
* parent directories are resolved chroot-style: in-image symlinks are followed with ``root`` as
  ``/`` (at most 40 hops) and ``..`` stops at ``root``, so a symlink can never lead outside;
* the entry itself is never followed: the old entry is removed, regular files are created with
  ``O_CREAT|O_EXCL|O_NOFOLLOW``, symlinks are stored as-is (absolute targets included);
* hardlink targets must already exist inside ``root`` and not be symlinks or directories; a
  link shares the target's inode, so its header's owner/mode/mtime are ignored (as GNU tar and
  umoci do): the target's entry set them;
* whiteouts ``.wh.NAME`` delete NAME of a lower layer (never an entry of their own layer),
  ``.wh..wh..opq`` empties the directory of lower-layer entries; aufs metadata (``.wh..wh.*``)
  is skipped;
* character/block devices and FIFOs are skipped and counted, never created;
* uncompressed bytes, per-file size and entry count are limited (bomb protection);
* numeric uid/gid (``lchown``), modes (setuid kept: hardening decides), mtimes clamped to
  :data:`EPOCH`, directory mtimes fixed in a final pass (adding children changes them).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import logging
import os
import queue
import shutil
import stat
import tarfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import zstandard

from ..core.config import BuilderConfig
from ..core.errors import ImageError, LayerError
from .oci import LAYER_TYPES, short_digest

if TYPE_CHECKING:
    from .source import ResolvedImage

# ISA-L's inflate is ~3x faster than zlib's on layer data (bench/build.py), same output; stdlib
# gzip is the fallback when the isal package is missing.
_GzipOpener = Callable[..., Any]
try:
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib

    _gunzip: _GzipOpener = _igzip.IGzipFile
    # the stub declares the exception class as an instance ("error: Exception")
    _ISAL_ERRORS: tuple[type[BaseException], ...] = (_isal_zlib.error,)  # type: ignore[assignment]
except ImportError:  # pragma: no cover
    _gunzip = gzip.GzipFile
    _ISAL_ERRORS = ()
# Errors of corrupt or truncated compressed data.
_CORRUPT: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error, *_ISAL_ERRORS)


# Fixed epoch every mtime is clamped to (2023-11-14T22:13:20Z): same image -> same tree.
EPOCH = 1_700_000_000
MAX_SYMLINK_HOPS = 40
# Deepest directory nesting accepted. Real images stay far below; without a cap a tiny layer can
# nest thousands of 1-char dirs, which breaks recursive tools (shutil.rmtree, mkfs) on cleanup.
MAX_DEPTH = 256
MAX_ID = 2**32 - 2  # uid/gid 2**32-1 is chown's "leave unchanged"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Files up to this size are read into memory and written by a pool of threads (creating a file
# costs a few syscalls that wait on the filesystem; overlapping them with reading the next entries
# is the biggest win on extraction). At most _PENDING_BYTES of file data waits in memory.
_POOL_FILE_MAX = 4 * 1024 * 1024
_PENDING_BYTES = 64 * 1024 * 1024
_WRITERS = 8
# How long a failed or cancelled layer waits for its fetch thread (see apply_layer).
_ABANDON_S = 1.0
# A layer's unchanged progress is passed on this often while it waits for data (_LayerProgress).
_STILL_S = 0.2
# Largest pax (x/g) or GNU long-name/link (L/K) header accepted: tarfile reads one whole into
# memory and parses it there. Real ones carry a path, times, a few xattrs: kilobytes.
MAX_META_HEADER = 1 << 20
_META_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})  # fmt: skip
_WH = ".wh."
_OPQ = ".wh..wh..opq"


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Limits:
    """What one layer may still add: uncompressed tar bytes (layer and image), entries."""

    max_layer_bytes: int = 2 * 1024**3
    max_image_bytes: int = 8 * 1024**3
    max_files: int = 500_000

    @classmethod
    def from_config(cls, cfg: BuilderConfig) -> Limits:
        return cls(cfg.max_layer_bytes, cfg.max_image_bytes, cfg.max_files)

    def minus(self, stats: LayerStats) -> Limits:
        """What is left for the next layers after ``stats``."""
        # Files can be larger than the tar that carries them (sparse entries): count the larger.
        used = max(stats.tar_bytes, stats.file_bytes)
        return replace(
            self,
            max_image_bytes=max(0, self.max_image_bytes - used),
            max_files=max(0, self.max_files - stats.entries),
        )


@dataclass
class LayerStats:
    """What applying one layer did."""

    digest: str = ""
    compressed_bytes: int = 0
    tar_bytes: int = 0
    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    file_bytes: int = 0
    skipped_devices: list[str] = field(default_factory=list)
    skipped_other: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


class _CountingReader:
    """Wraps the uncompressed stream: sha256 for diff_id, and the byte limits (bomb guard)."""

    def __init__(self, inner: _Readable, limit: int, err: Callable[[str], Exception]) -> None:
        self._inner = inner
        self._limit = limit
        self._err = err
        self.hash = hashlib.sha256()
        self.count = 0
        self._over = False

    def read(self, n: int = -1) -> bytes:
        if self.count >= self._limit and self._over:
            raise self._err(f"uncompressed layer exceeds the {self._limit}-byte limit (tar bomb?)")
        b = self._inner.read(n if n is not None and n >= 0 else 1 << 20)
        if self.count + len(b) > self._limit:
            # Hand out the bytes up to the limit first: the reader may find a clearer error in
            # them (the entry whose size is over the limit); the next read raises.
            self._over = True
            b = b[: self._limit - self.count]
            if not b:
                raise self._err(
                    f"uncompressed layer exceeds the {self._limit}-byte limit (tar bomb?)"
                )
        self.count += len(b)
        self.hash.update(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo refusing metadata headers over :data:`MAX_META_HEADER` before tarfile reads
    them (a tiny compressed layer could otherwise make it hold gigabytes)."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > MAX_META_HEADER:
            kind = "long-name" if self.type in (tarfile.GNUTYPE_LONGNAME,
                                                tarfile.GNUTYPE_LONGLINK) else "pax"  # fmt: skip
            raise tarfile.HeaderError(
                f"{kind} header of {self.size} bytes, over the {MAX_META_HEADER}-byte limit"
            )
        return super()._proc_member(tf)  # type: ignore[misc,no-any-return]  # not in the stubs


class _Stopped(Exception):
    """The pipeline was closed while a stage waited for data (never reaches the caller)."""


class _Prefetch:
    """Reads ``inner`` in a thread, ahead of its reader. Two are chained per layer: one pulls the
    blob (download + digest), one decompresses it and hashes the tar (diff_id); the network,
    ISA-L/zlib/zstd and sha256 all release the GIL, so fetching, decompressing and creating the
    files overlap. Errors are raised to the reader, in order. After the end of ``inner``,
    ``at_eof`` runs in the thread (draining the blob so its digest is verified). All stages of a
    layer share ``stop``: once it is set, every stage ends (a waiting read raises ``_Stopped``).
    apply_layer joins the threads, so after a successful layer nothing reads the blob any more;
    after a failed one the fetch thread may finish a read already under way (then stops).
    ``on_idle`` runs each time the creating thread waited 0.1 s for data (never in another
    stage's thread)."""

    _END = object()

    def __init__(
        self,
        inner: _Readable,
        stop: threading.Event,
        at_eof: Callable[[], None] | None = None,
        name: str = "layer-read",
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self._inner = inner
        self._at_eof = at_eof
        self._on_idle = on_idle
        self._owner = threading.current_thread()  # on_idle runs only in the creator's thread
        self._q: queue.Queue[object] = queue.Queue(maxsize=16)
        self._stop = stop
        self._buf = b""
        self._pos = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                b = self._inner.read(1 << 20)
                if not b:
                    if self._at_eof is not None:
                        self._at_eof()
                    break
                if not self._put(b):
                    return
        except BaseException as e:  # handed to the reader, raised there
            self._put(e)
            return
        self._put(self._END)

    def _get(self) -> object:
        while True:
            try:
                return self._q.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stopped from None
                if self._on_idle is not None and threading.current_thread() is self._owner:
                    self._on_idle()  # the reader's chance to give up (a cancel)

    def read(self, n: int = -1) -> bytes:
        if self._pos >= len(self._buf):
            if self._done:
                return b""
            item = self._get()
            if item is self._END:
                self._done = True
                return b""
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._buf, self._pos = item, 0  # type: ignore[assignment]
        end = len(self._buf) if n is None or n < 0 else min(len(self._buf), self._pos + n)
        out = self._buf[self._pos : end]
        self._pos = end
        return out

    def readinto(self, buf: memoryview | bytearray) -> int:
        b = self.read(len(buf))
        buf[: len(b)] = b
        return len(b)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


class _Applier:
    def __init__(self, root: Path, digest: str, limits: Limits, stats: LayerStats) -> None:
        self.root = root
        self.digest = digest
        self.limits = limits
        self.stats = stats
        self.is_root = os.geteuid() == 0
        # Paths (relative, '/'-joined) created or replaced by this layer: opaque markers keep them.
        self.created: set[str] = set()
        # Directories this layer already made opaque (see make_opaque).
        self.opaque: set[str] = set()
        # Directory rel path -> mtime to restore at the end (their children changed).
        self.touched: dict[str, int] = {}
        # Directory rel path -> mtime from this layer's own entry.
        self.dir_mtimes: dict[str, int] = {}
        self.progress: Callable[[], None] | None = None
        # lstat is the main thread's biggest syscall cost. Directory keys known to be real
        # directories (not symlinks) right now, and those this layer created empty (mkdir): a
        # name below a fresh dir that this layer did not create cannot exist yet. Any removal
        # forgets both (conservative: removals are rare).
        self.known_dirs: set[str] = set()
        self.fresh_dirs: set[str] = set()
        # Deferred creations (regular files, symlinks) by rel key; see submit()/sync().
        self.pool: ThreadPoolExecutor | None = None
        self.pending: dict[str, Future[None]] = {}
        self.queue: deque[tuple[Future[None], int]] = deque()
        self.queued_bytes = 0

    # -- deferred creations -------------------------------------------------------------------
    #
    # Creating a regular file or symlink is handed to a thread pool; everything that looks at or
    # changes existing entries (lstat of a path, removal, whiteouts, opaque dirs, hardlinks,
    # directory metadata) runs here, in order. A path with a creation still in flight is waited
    # for (sync) before anything looks at it, so the tree seen here is always the tree the entries
    # so far describe. A job only creates its own final component (O_CREAT|O_EXCL|O_NOFOLLOW or
    # symlink(2), which never follow it) inside a parent resolved here to a real directory; no job
    # ever removes or renames anything, so no job can change what another one resolves through.

    def submit(self, key: str, job: Callable[[], None], nbytes: int) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(_WRITERS, thread_name_prefix="layer-write")
        while self.queue and (
            self.queued_bytes + nbytes > _PENDING_BYTES or len(self.queue) > 4096
        ):
            fut, n = self.queue.popleft()
            fut.result()
            self.queued_bytes -= n
        fut = self.pool.submit(job)
        self.pending[key] = fut
        self.queue.append((fut, nbytes))
        self.queued_bytes += nbytes

    def wait_for(self, key: str) -> None:
        fut = self.pending.get(key)
        if fut is not None and not fut.done():
            self.sync()

    def sync(self) -> None:
        """Wait for every deferred creation; raises the first one's error."""
        futs = [f for f, _ in self.queue]
        self.queue.clear()
        self.pending.clear()
        self.queued_bytes = 0
        wait(futs)
        for f in futs:
            f.result()

    def shutdown(self) -> None:
        """Wait for every job (errors ignored: the layer already failed or sync() raised)."""
        with contextlib.suppress(BaseException):
            wait([f for f, _ in self.queue])
        self.queue.clear()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def err(self, name: str, msg: str) -> LayerError:
        return LayerError(
            f'layer {short_digest(self.digest)}: entry "{name}": {msg}',
            details={"layer": self.digest, "entry": name},
        )

    # -- paths --------------------------------------------------------------------------------

    def split_name(self, name: str) -> list[str]:
        if "\x00" in name:
            raise self.err(name, "NUL byte in name")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.err(name, "path escapes the root ('..' component)")
        return parts

    def abs(self, rel: list[str]) -> Path:
        return self.root.joinpath(*rel) if rel else self.root

    def touch(self, rel: list[str]) -> None:
        key = "/".join(rel)
        if key not in self.touched:
            self.touched[key] = min(os.lstat(self.abs(rel)).st_mtime_ns // 1_000_000_000, EPOCH)

    def resolve_dir(self, name: str, parts: list[str], create: bool) -> list[str]:
        got = self.walk(name, parts, create)
        if got is None:  # pragma: no cover (walk only returns None with missing_ok)
            raise self.err(name, "parent directory does not exist")
        return got

    def walk(
        self, name: str, parts: list[str], create: bool, missing_ok: bool = False
    ) -> list[str] | None:
        """Resolve directory components chroot-style; returns the real rel path (no symlinks).

        Missing directories are created (0755, root-owned) when ``create``.
        """
        todo = list(reversed(parts))
        cur: list[str] = []
        hops = 0
        while todo:
            c = todo.pop()
            if c in ("", "."):
                continue
            if c == "..":
                if cur:
                    cur.pop()
                continue
            self.check_depth(name, [*cur, c])
            ckey = "/".join([*cur, c])
            if ckey in self.known_dirs:
                cur.append(c)
                continue
            if self.pending:
                self.wait_for(ckey)
            p = self.abs([*cur, c])
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                if missing_ok:
                    return None
                if not create:
                    raise self.err(
                        name, f"parent directory /{'/'.join([*cur, c])} does not exist"
                    ) from None
                self.touch(cur)
                p.mkdir(0o755)
                self.touched[ckey] = EPOCH
                self.created.add(ckey)
                self.known_dirs.add(ckey)
                self.fresh_dirs.add(ckey)
                cur.append(c)
                continue
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise self.err(
                        name, f"too many levels of symbolic links (> {MAX_SYMLINK_HOPS})"
                    )
                target = os.fsdecode(os.readlink(os.fspath(p)))  # noqa: PTH115 (need the raw text)
                if target.startswith("/"):
                    cur = []
                todo.extend(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise self.err(name, f"parent /{'/'.join([*cur, c])} is not a directory")
            self.known_dirs.add(ckey)
            cur.append(c)
        return cur

    def check_depth(self, name: str, rel: list[str]) -> None:
        if len(rel) > MAX_DEPTH:
            raise self.err(name, f"path nests deeper than {MAX_DEPTH} directories")

    def absent(self, parent: list[str], key: str) -> bool:
        """True when ``key`` (a child of ``parent``) surely does not exist (no lstat needed)."""
        return "/".join(parent) in self.fresh_dirs and key not in self.created

    def remove(self, rel: list[str]) -> bool:
        p = self.abs(rel)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return False
        self.known_dirs.clear()
        self.fresh_dirs.clear()
        if stat.S_ISDIR(st.st_mode):
            self.sync()  # creations below it may be in flight
            shutil.rmtree(p)
        else:
            p.unlink()
        return True

    # -- entries ------------------------------------------------------------------------------

    def apply(self, tf: tarfile.TarFile) -> None:
        for m in tf:
            self.stats.entries += 1
            if self.stats.entries > self.limits.max_files:
                raise self.err(
                    m.name, f"too many entries (limit {self.limits.max_files} files per image)"
                )
            self.entry(tf, m)
            if self.progress is not None:
                self.progress()
        self.sync()

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        name = m.name
        parts = self.split_name(name)
        if not parts:
            return  # the root itself ("./"): its metadata stays ours
        base = parts[-1]
        if base.startswith(_WH):
            self.whiteout(name, parts)
            return
        if m.ischr() or m.isblk() or m.isfifo():
            self.stats.skipped_devices.append("/" + "/".join(parts))
            return
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            self.stats.skipped_other.append("/" + "/".join(parts))
            return
        if not (0 <= m.uid <= MAX_ID and 0 <= m.gid <= MAX_ID):
            raise self.err(name, f"uid/gid {m.uid}:{m.gid} out of range")
        parent = self.resolve_dir(name, parts[:-1], create=True)
        rel = [*parent, base]
        self.check_depth(name, rel)
        key = "/".join(rel)
        dest = self.abs(rel)
        if self.pending:
            self.wait_for(key)
        self.touch(parent)
        if m.isdir():
            st: os.stat_result | None = None
            if not self.absent(parent, key):
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(dest)
            if st is None or not stat.S_ISDIR(st.st_mode):
                if st is not None:
                    self.remove(rel)  # a file or symlink: unlink (and forget cached dirs)
                dest.mkdir(0o700)
                self.fresh_dirs.add(key)
            self.known_dirs.add(key)
            self.created.add(key)
            self.stats.dirs += 1
            self.meta(dest, m, is_link=False)
            self.dir_mtimes[key] = min(int(m.mtime), EPOCH)
            return
        if m.islnk():
            self.sync()  # the target may be in flight
            tparts = self.split_name_link(name, m.linkname)
            tparent = self.resolve_dir(name, tparts[:-1], create=False)
            target = self.abs([*tparent, tparts[-1]])
            try:
                tst = os.lstat(target)
            except FileNotFoundError:
                raise self.err(
                    name, f"hardlink target {m.linkname!r} does not exist in the image"
                ) from None
            if stat.S_ISLNK(tst.st_mode):
                raise self.err(name, f"hardlink target {m.linkname!r} is a symlink")
            if stat.S_ISDIR(tst.st_mode):
                raise self.err(name, f"hardlink target {m.linkname!r} is a directory")
            if [*tparent, tparts[-1]] == rel:
                return  # a link to itself: nothing to do
            self.remove(rel)
            os.link(target, dest, follow_symlinks=False)
            self.created.add(key)
            self.stats.hardlinks += 1
            # No metadata from the link's header: a hardlink is one more name of the target's
            # inode, whose owner/mode/mtime came with the target's own entry. POSIX tar defines
            # LNKTYPE as "linked to the file named by linkname"; GNU tar and umoci (the OCI
            # reference unpacker) ignore the rest of the header, and so do we, so a link entry
            # cannot re-own or chmod (e.g. setuid) a file of a lower layer without rewriting it.
            return
        if not self.absent(parent, key):
            self.remove(rel)
        self.created.add(key)
        if m.issym():
            if "\x00" in m.linkname:
                raise self.err(name, "NUL byte in symlink target")
            self.submit(key, self.symlink_job(dest, m), 0)
            self.stats.symlinks += 1
            return
        # Regular file.
        if m.size > self.limits.max_layer_bytes:
            raise self.err(
                name, f"file is {m.size} bytes, over the {self.limits.max_layer_bytes}-byte limit"
            )
        if self.stats.file_bytes + m.size > self.limits.max_image_bytes:
            # Sparse entries expand to more bytes than the tar holds; the tar byte count alone
            # would let a few KiB of headers write gigabytes of zeros.
            raise self.err(
                name,
                f"files add up to more than the {self.limits.max_image_bytes}-byte image limit "
                f"(this file: {m.size} bytes)",
            )
        src = tf.extractfile(m)
        if src is None or m.size <= _POOL_FILE_MAX:
            data = src.read(m.size) if src is not None and m.size else b""
            if len(data) != m.size:
                raise self.err(name, "unexpected end of layer data inside the file")
            self.submit(key, self.file_job(dest, m, [data]), m.size)
        else:
            # Large files are streamed in chunks without holding them whole in memory.
            fd = _create(dest)
            try:
                left = m.size
                while left > 0:
                    b = src.read(min(left, 1 << 20))
                    if not b:
                        raise self.err(name, "unexpected end of layer data inside the file")
                    _write_all(fd, b)
                    left -= len(b)
                    if self.progress is not None:
                        self.progress()
                self.file_meta(fd, m)
            finally:
                os.close(fd)
        self.stats.files += 1
        self.stats.file_bytes += m.size

    def file_job(self, dest: Path, m: tarfile.TarInfo, chunks: list[bytes]) -> Callable[[], None]:
        def job() -> None:
            fd = _create(dest)
            try:
                for b in chunks:
                    _write_all(fd, b)
                self.file_meta(fd, m)
            finally:
                os.close(fd)

        return job

    def symlink_job(self, dest: Path, m: tarfile.TarInfo) -> Callable[[], None]:
        def job() -> None:
            dest.symlink_to(m.linkname)
            self.meta(dest, m, is_link=True)

        return job

    def split_name_link(self, name: str, linkname: str) -> list[str]:
        if "\x00" in linkname:
            raise self.err(name, "NUL byte in hardlink target")
        parts = [p for p in linkname.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.err(name, f"hardlink target {linkname!r} escapes the root")
        if not parts:
            raise self.err(name, "hardlink to the root directory")
        return parts

    def whiteout(self, name: str, parts: list[str]) -> None:
        self.sync()
        base = parts[-1]
        parent = self.walk(name, parts[:-1], create=False, missing_ok=True)
        if parent is None:
            return  # whiteout below a directory that does not exist: nothing to remove
        if base == _OPQ:
            # Once done, nothing below ``parent`` is of a lower layer any more (what this layer
            # adds later is its own), so a repeated marker there, or below it, is a no-op:
            # without that, many markers re-listed a big directory each (hours per layer).
            if not any("/".join(parent[:i]) in self.opaque for i in range(len(parent) + 1)):
                self.make_opaque(parent)
                self.opaque.add("/".join(parent))
            self.stats.opaque_dirs += 1
            return
        target = base[len(_WH) :]
        if target.startswith(_WH):
            # aufs metadata (.wh..wh.aufs, .wh..wh.plnk/, .wh..wh.orph/) in layers written by
            # Docker's old aufs driver: not a whiteout of anything; moby and umoci skip it too
            self.stats.skipped_other.append("/" + "/".join(parts))
            return
        if target in ("", ".", ".."):
            raise self.err(name, f"invalid whiteout target {target!r}")
        if "/".join([*parent, target]) in self.created:
            # OCI: a whiteout hides lower layers only, never an entry of its own layer
            return
        self.touch(parent)
        if self.remove([*parent, target]):
            self.stats.whiteouts += 1

    def make_opaque(self, rel: list[str]) -> None:
        """Remove lower-layer entries below ``rel``; keep (and descend into) this layer's own."""
        self.touch(rel)
        prefix = "/".join(rel)
        for child in sorted(c.name for c in self.abs(rel).iterdir()):
            key = f"{prefix}/{child}" if prefix else child
            if key not in self.created:
                self.remove([*rel, child])
            elif stat.S_ISDIR(os.lstat(self.abs([*rel, child])).st_mode):
                self.make_opaque([*rel, child])

    def file_meta(self, fd: int, m: tarfile.TarInfo) -> None:
        """Owner, mode, mtime of a new regular file, on its descriptor (no path lookups)."""
        if self.is_root and (m.uid or m.gid):  # created by root: already 0:0
            os.fchown(fd, m.uid, m.gid)
        if m.mode & 0o7777 != 0o600:  # _create's mode (chown above cleared no bits yet)
            os.fchmod(fd, m.mode & 0o7777)
        mt = min(int(m.mtime), EPOCH)
        os.utime(fd, (mt, mt))

    def meta(self, path: Path, m: tarfile.TarInfo, *, is_link: bool) -> None:
        if self.is_root and (m.uid or m.gid or not is_link):
            os.lchown(path, m.uid, m.gid)
        if not is_link:
            path.chmod(m.mode & 0o7777)
        os.utime(path, (min(int(m.mtime), EPOCH),) * 2, follow_symlinks=False)

    def finish(self) -> None:
        """Directory mtimes last: creating children changed them."""
        self.shutdown()
        want = dict(self.touched)
        want.update(self.dir_mtimes)
        # A recorded directory may have been replaced since, itself or a parent (by a file, or
        # by a symlink leading anywhere, the host included): set a time only where every
        # component is still a real directory, checked with lstat from the root down.
        real: dict[str, bool] = {"": True}

        def is_real_dir(key: str) -> bool:
            if key not in real:
                parent = key.rpartition("/")[0]
                ok = is_real_dir(parent)
                if ok:
                    try:
                        ok = stat.S_ISDIR(os.lstat(self.root / key).st_mode)
                    except OSError:
                        ok = False
                real[key] = ok
            return real[key]

        for key, mt in sorted(want.items(), key=lambda kv: -kv[0].count("/")):
            if is_real_dir(key):
                p = self.root / key if key else self.root
                os.utime(p, (mt, mt), follow_symlinks=False)


def _create(dest: Path) -> int:
    return os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _write_all(fd: int, b: bytes) -> None:
    view = memoryview(b)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _Peek:
    """Peek the first bytes of a stream (compression magic) without consuming them."""

    def __init__(self, inner: _Readable) -> None:
        self._inner = inner
        self._head = b""

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            b = self._inner.read(n - len(self._head))
            if not b:
                break
            self._head += b
        return self._head[:n]

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0 or n >= len(self._head):
                out, self._head = self._head, b""
                if n is not None and n >= 0 and n > len(out):
                    out += self._inner.read(n - len(out))
                elif n is None or n < 0:
                    out += self._inner.read()
                return out
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._inner.read(n)

    def readinto(self, buf: memoryview | bytearray) -> int:  # ISA-L's gzip reader uses it
        b = self.read(len(buf))
        buf[: len(b)] = b
        return len(b)


def _open_decompressed(
    peek: _Peek, media_type: str, err: Callable[[str], Exception]
) -> tuple[_Readable, str]:
    if media_type not in LAYER_TYPES:
        raise err(f"unsupported layer media type {media_type!r}")
    want = LAYER_TYPES[media_type]
    head = peek.peek(4)
    if head.startswith(_GZIP_MAGIC):
        kind = "gzip"
    elif head == _ZSTD_MAGIC:
        kind = "zstd"
    else:
        kind = ""
    if want and kind != want:
        raise err(f"layer data is not {want} ({media_type}); first bytes {head.hex() or '(empty)'}")
    if kind == "gzip":
        return _gunzip(fileobj=peek, mode="rb"), kind
    if kind == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(peek, read_across_frames=True)  # type: ignore[arg-type]
        return reader, kind
    return peek, kind


def apply_layer(
    stream: _Readable,
    root: Path,
    *,
    media_type: str,
    layer_digest: str,
    diff_id: str | None = None,
    limits: Limits | None = None,
    size: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> LayerStats:
    """Apply one layer (compressed blob stream, read once, front to back) onto ``root``.

    ``media_type`` must be a known layer type; compression is taken from the data's magic bytes
    (a type promising gzip/zstd must carry it). ``diff_id`` (sha256 of the uncompressed tar) is
    checked when given. If ``stream`` has a ``drain()`` (a :class:`~.oci.VerifiedStream`), the
    rest of the blob is read afterwards so its digest is verified.

    ``progress(done, total)`` is called on the caller's thread as entries are applied (and per
    MiB of a large file): ``done`` is the compressed bytes read from ``stream`` so far (its
    ``bytes_read`` when it has one, else uncompressed tar bytes), ``total`` is ``size`` (the
    blob size; 0 when unknown); once more at the end. ``stream`` itself is read by a read-ahead
    thread, so any callback ``stream`` makes (e.g. a VerifiedStream's) runs on that thread.

    Raises :class:`LayerError` (``layer sha256:abcd…: entry "x": what``) for hostile or broken
    entries and corrupt data, :class:`ImageError` for blob digest/size problems. On error
    ``root`` holds a partial tree (discard it); nothing is ever written outside ``root``.
    """
    lim = limits or Limits()
    root = Path(os.path.realpath(root))
    if not root.is_dir():
        raise LayerError(f"layer {short_digest(layer_digest)}: target {root} is not a directory")
    stats = LayerStats(digest=layer_digest)
    applier = _Applier(root, layer_digest, lim, stats)

    def lerr(msg: str) -> LayerError:
        return LayerError(
            f"layer {short_digest(layer_digest)}: {msg}", details={"layer": layer_digest}
        )

    counter: _CountingReader | None = None

    def report() -> None:
        if progress is not None:
            done = getattr(stream, "bytes_read", None)
            if not isinstance(done, int):
                done = counter.count if counter is not None else 0
            progress(done, size)

    # While this thread waits for data (a stalled registry), the caller's progress still runs:
    # that is where a build notices its cancel.
    idle = report if progress is not None else None
    # Stage 1 reads the whole blob, then drains it (its digest verified) before reporting the end.
    stop = threading.Event()
    drain = getattr(stream, "drain", None)
    raw = _Prefetch(stream, stop, at_eof=drain if callable(drain) else None, name="layer-fetch",
                    on_idle=idle)  # fmt: skip
    peek = _Peek(raw)
    try:
        decomp, _kind = _open_decompressed(peek, media_type, lerr)
    except BaseException:
        stop.set()
        raw.join(_ABANDON_S)
        raise
    budget = min(lim.max_layer_bytes, lim.max_image_bytes)
    counter = _CountingReader(decomp, budget, lerr)
    if progress is not None:
        applier.progress = report
    # Stage 2 (decompress + diff_id hash) reads from stage 1 (the blob), started below.
    pre = _Prefetch(counter, stop, name="layer-inflate", on_idle=idle)
    ok = False
    try:
        with tarfile.open(fileobj=pre, mode="r|", bufsize=1 << 16,  # type: ignore[call-overload]
                          tarinfo=_BoundedTarInfo) as tf:  # fmt: skip
            applier.apply(tf)
        pre.drain()
        ok = True
    except (LayerError, ImageError):
        raise
    except tarfile.TarError as e:
        if isinstance(e.__context__, (*_CORRUPT, zstandard.ZstdError)):
            raise lerr(f"corrupt or truncated compressed data: {e}") from e
        raise lerr(f"not a valid tar stream: {e}") from e
    except _CORRUPT as e:
        raise lerr(f"corrupt or truncated compressed data: {e}") from e
    except zstandard.ZstdError as e:
        raise lerr(f"corrupt zstd data: {e}") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise lerr(f"cannot apply layer: {e}") from e
    finally:
        stop.set()
        pre.join()
        # On success the fetch stage has ended (end of blob). On an error or a cancel it may sit
        # in a read of a stalled registry until the read timeout: it stops by itself then (it
        # sees ``stop``), so it is not waited for beyond a moment.
        raw.join(None if ok else _ABANDON_S)
        applier.finish()
    stats.tar_bytes = counter.count
    report()
    stats.compressed_bytes = int(getattr(stream, "bytes_read", 0))
    if diff_id is not None:
        got = "sha256:" + counter.hash.hexdigest()
        if got != diff_id:
            raise LayerError(
                f"layer {short_digest(layer_digest)}: diff_id mismatch: "
                f"config says {diff_id}, uncompressed tar is {got}",
                details={"layer": layer_digest, "diff_id": diff_id, "actual": got},
            )
    return stats


@dataclass
class ExtractStats:
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def skipped_devices(self) -> list[str]:
        return [p for s in self.layers for p in s.skipped_devices]

    @property
    def tar_bytes(self) -> int:
        return sum(s.tar_bytes for s in self.layers)

    @property
    def entries(self) -> int:
        return sum(s.entries for s in self.layers)


# progress(layer_index, bytes_read_so_far, layer_size)
Progress = Callable[[int, int, int], None]


class _LayerProgress:
    """One layer's blob bytes: counted by the read-ahead thread (``add``, the stream's callback),
    passed on from the caller's thread (``report``, apply_layer's callback) when changed, and
    unchanged every :data:`_STILL_S` (a stalled download: the callback is also where the caller
    can stop the layer, e.g. a cancelled build). The stream reports the chunk completing the
    blob only once its digest is verified, so the layer size is reached only for a verified
    blob."""

    def __init__(self, index: int, size: int, progress: Progress | None) -> None:
        self.index, self.size, self.progress = index, size, progress
        self.done = 0
        self.shown = -1
        self.shown_at = 0.0

    def add(self, k: int) -> None:
        self.done += k  # one writer (the read-ahead thread); int rebinding is atomic

    def report(self, _done: int, _total: int) -> None:
        done = self.done
        now = time.monotonic()
        if self.progress is not None and (done != self.shown or now - self.shown_at >= _STILL_S):
            self.shown, self.shown_at = done, now
            self.progress(self.index, done, self.size)


def extract_image(
    image: ResolvedImage,
    root: Path,
    limits: Limits | BuilderConfig | None = None,
    log: Callable[[str], None] | logging.Logger | None = None,
    *,
    progress: Progress | None = None,
) -> ExtractStats:
    """Apply every layer of a :class:`~.source.ResolvedImage` onto ``root`` in order.

    Each verified blob is streamed straight into :func:`apply_layer` (no temp copy). ``progress``
    gets ``(layer index, compressed bytes read, layer size)`` as data arrives; ``log`` (a callable
    taking a line, or a Logger) gets one line per layer and one per skipped device node.
    Limits (bytes, files) apply to the whole image. ``root`` must exist (ideally empty); its mtime
    is set to :data:`EPOCH` at the end.
    """
    lim = (
        limits
        if isinstance(limits, Limits)
        else Limits.from_config(limits)
        if limits is not None
        else Limits()
    )

    def say(line: str) -> None:
        if log is None:
            return
        if isinstance(log, logging.Logger):
            log.info(line)
        else:
            log(line)

    out = ExtractStats()
    n = len(image.layers)
    for layer in image.layers:
        counter = _LayerProgress(layer.index, layer.size, progress)
        say(
            f"layer {layer.index + 1}/{n} {short_digest(layer.digest)} "
            f"({layer.size} bytes): applying"
        )
        with image.open_layer(layer, counter.add) as stream:
            st = apply_layer(
                stream,
                root,
                media_type=layer.media_type,
                layer_digest=layer.digest,
                diff_id=layer.diff_id,
                limits=lim,
                size=layer.size,
                progress=counter.report,
            )
        lim = lim.minus(st)
        out.layers.append(st)
        say(
            f"layer {layer.index + 1}/{n} {short_digest(layer.digest)}: {st.entries} entries, "
            f"{st.tar_bytes} bytes uncompressed, {st.whiteouts} whiteouts"
        )
        for dev in st.skipped_devices:
            say(f"layer {short_digest(layer.digest)}: skipped device node or FIFO {dev}")
    os.utime(root, (EPOCH, EPOCH), follow_symlinks=False)
    return out


__all__ = ["EPOCH", "ExtractStats", "LayerStats", "Limits", "apply_layer", "extract_image"]
