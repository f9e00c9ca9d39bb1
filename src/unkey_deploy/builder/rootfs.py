"""rootfs.ext4 from a directory tree, reproducibly, then zstd for storage.

Same tree + same seed -> the same bytes: the filesystem UUID and directory hash seed are derived
from the seed (manifest digest + build options), e2fsprogs' clocks are pinned
(``E2FSPROGS_FAKE_TIME`` for mkfs/resize2fs, ``E2FSCK_TIME`` for e2fsck; 1.47.0 ignores
``SOURCE_DATE_EPOCH``), and every mtime/atime in the tree is clamped to :data:`EPOCH`.

Size: ``du * 1.2 + inodes/4 KiB + 16 MiB`` (never ran out in the measurements of
``design/notes/oci.md``), then ``resize2fs -M`` shrinks it to what the files need. The image is
journal-less with ``-m 0`` (the root filesystem of a single app: no reserved blocks, and the VM
gets a writable overlay anyway), 4 KiB blocks, 256-byte inodes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from ..core.errors import BuildFailed, ResourceExhausted

EPOCH = 1_700_000_000
CHUNK = 1 << 20


@dataclass(frozen=True)
class RootfsInfo:
    path: str
    bytes: int  # apparent size of the ext4 image
    sha256: str
    tree_bytes: int
    inodes: int
    uuid: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Compressed:
    path: str
    bytes: int
    sha256: str
    level: int


def _uuid(seed: str, purpose: str) -> str:
    return str(
        uuid.UUID(bytes=hashlib.sha256(f"{purpose}\0{seed}".encode()).digest()[:16], version=4)
    )


# ext4 keeps a symlink target shorter than this in the inode; a longer one takes a block
_FAST_SYMLINK_MAX = 60
_BLOCK = 4096


def _clamp_times(tree: Path) -> tuple[int, int]:
    """Clamp every time to EPOCH (deepest first); returns (bytes ext4 will allocate, entries).

    The host's allocation (``st_blocks``) is ext4's for file data, but not for directories and
    long symlinks, which take a block each in ext4 and none on a tmpfs or XFS (inline): those
    count at least one block, so the image size does not depend on where the tree lies."""
    total, count = 0, 0
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(tree, topdown=False):
        for name in (*filenames, *dirnames):
            p = str(Path(dirpath) / name)
            st = os.lstat(p)
            count += 1
            if not (st.st_nlink > 1 and st.st_ino in seen):
                seen.add(st.st_ino)
                used = st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode) or (
                    stat.S_ISLNK(st.st_mode) and st.st_size >= _FAST_SYMLINK_MAX
                ):
                    used = max(used, _BLOCK)
                total += used
            os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(tree, (EPOCH, EPOCH))
    return total, count + 1


def _run(cmd: list[str], env: dict[str, str], what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0 and not (cmd[0] == "e2fsck" and "-fy" in cmd and proc.returncode == 1):
        # both streams: e2fsck says what it found on stdout and only its banner on stderr
        text = "\n".join(t.strip() for t in (proc.stderr, proc.stdout) if t.strip())
        msg = text if len(text) <= 800 else f"{text[:500]} … {text[-300:]}"
        if "No space left" in text or "Could not allocate" in text:
            raise ResourceExhausted(f"{what}: {msg}")
        raise BuildFailed(f"{what} failed (exit {proc.returncode}): {msg}")
    return proc


# make_rootfs's steps, in order (its progress reports how many are done out of these)
ROOTFS_STEPS = ("clamp times", "mkfs.ext4 -d", "pin ctimes", "e2fsck -fy", "resize2fs -M",
                "e2fsck -fn", "sha256")  # fmt: skip


def make_rootfs(
    tree: Path,
    out: Path,
    *,
    seed: str,
    progress: Callable[[int, int], None] | None = None,
) -> RootfsInfo:
    """Build ``out`` (ext4) from ``tree``; verified with ``e2fsck -fn``.

    ``progress(done, total)`` gets the number of :data:`ROOTFS_STEPS` finished (0 first)."""
    total = len(ROOTFS_STEPS)

    def step(done: int) -> None:
        if progress is not None:
            progress(done, total)

    step(0)
    tree_bytes, inodes = _clamp_times(tree)
    step(1)
    size_kib = int(tree_bytes / 1024 * 1.2 + inodes / 4 + 16384)
    size_kib = (size_kib + 3) // 4 * 4
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size_kib * 1024)  # sparse
    fs_uuid, hash_seed = _uuid(seed, "uuid"), _uuid(seed, "hash_seed")
    env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")},
        "E2FSPROGS_FAKE_TIME": str(EPOCH),
        "E2FSCK_TIME": str(EPOCH),
    }
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    # fmt: off
    _run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-L", "rootfs", "-U", fs_uuid,
          "-E", f"root_owner=0:0,hash_seed={hash_seed}", "-O", "^has_journal", "-m", "0",
          "-N", str(inodes + 1024), "-b", "4096", "-I", "256", "-T", "default", str(out)],
         env, "mkfs.ext4 -d")
    # fmt: on
    step(2)
    _pin_ctimes(out, env)
    step(3)
    _run(["e2fsck", "-fy", str(out)], env, "e2fsck -fy")
    step(4)
    _run(["resize2fs", "-M", str(out)], env, "resize2fs -M")
    step(5)
    # The image is final now: hash it while e2fsck -fn (read-only) verifies it.
    with ThreadPoolExecutor(1) as pool:
        hashing = pool.submit(sha256_file, out)
        _run(["e2fsck", "-fn", str(out)], env, "e2fsck -fn (verification)")
        step(6)
        digest = hashing.result()
    step(7)
    return RootfsInfo(
        path=str(out),
        bytes=out.stat().st_size,
        sha256=digest,
        tree_bytes=tree_bytes,
        inodes=inodes,
        uuid=fs_uuid,
    )


def _used_inodes(image: Path, env: dict[str, str]) -> list[int]:
    """Inode numbers in use, from ``dumpe2fs``'s per-group free-inode ranges."""
    text = _run(["dumpe2fs", str(image)], env, "dumpe2fs").stdout
    per_group = 0
    used: list[int] = []
    group = -1
    for line in text.splitlines():
        if line.startswith("Inodes per group:"):
            per_group = int(line.split(":")[1])
        elif re.match(r"Group \d+:", line):
            group = int(line.split()[1].rstrip(":"))
        elif line.strip().startswith("Free inodes:") and group >= 0 and per_group:
            first, last = group * per_group + 1, (group + 1) * per_group
            free: set[int] = set()
            for raw in line.split(":", 1)[1].split(","):
                part = raw.strip()
                if part:
                    lo, _, hi = part.partition("-")
                    free.update(range(int(lo), int(hi or lo) + 1))
            used.extend(i for i in range(first, last + 1) if i not in free)
    return used


def _pin_ctimes(image: Path, env: dict[str, str]) -> None:
    """``mkfs -d`` copies each file's ctime, which nobody can set on the host (it is the time of
    the last inode change), so two builds of one image would differ: pin every used inode's ctime
    to EPOCH with ``debugfs`` (by inode number: no file name ever reaches its command parser)."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(EPOCH))
    cmds = "".join(f"sif <{i}> ctime {stamp}\n" for i in _used_inodes(image, env))
    proc = subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=cmds,
                          capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise BuildFailed(f"debugfs (pin ctimes) failed: {proc.stderr.strip()[-400:]}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def compress(
    src: Path,
    dst: Path,
    *,
    level: int = 3,
    threads: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> Compressed:
    """zstd ``src`` into ``dst`` (checksum + content size in the frame), hashing the output on
    the way. Uses the ``zstd`` CLI when installed (measured ~2x faster here than the zstandard
    module at the same level and threads: bench/build.py), else the module. Either is
    deterministic: same input, level and tool version -> same bytes, whatever ``threads``.

    ``progress(done, total)`` gets the bytes of ``src`` compressed so far and its size."""
    size = src.stat().st_size
    tmp = dst.with_name(dst.name + ".part")
    out = _HashingWriter(open(tmp, "wb"))  # noqa: SIM115 (closed below / by the stream writer)
    if progress is not None:
        progress(0, size)
    cli = shutil.which("zstd")
    try:
        if cli is not None:
            _compress_cli(cli, src, out, size=size, level=level, threads=threads, progress=progress)
            out.close()
        else:
            _compress_module(src, out, size=size, level=level, threads=threads, progress=progress)
    except BaseException:
        out.close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dst)
    return Compressed(str(dst), out.count, out.hash.hexdigest(), level)


def _compress_cli(
    cli: str,
    src: Path,
    out: _HashingWriter,
    *,
    size: int,
    level: int,
    threads: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    # src goes through stdin (fed here) so progress counts the bytes zstd consumed;
    # --stream-size puts the content size in the frame as for a file input.
    cmd = [cli, "-q", f"-{level}", f"-T{max(1, threads)}", "--check", f"--stream-size={size}", "-c"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None  # noqa: S101
    stdin, stdout = proc.stdin, proc.stdout
    fed = 0

    def feed() -> None:
        nonlocal fed
        try:
            with open(src, "rb") as fin:
                while chunk := fin.read(CHUNK):
                    stdin.write(chunk)
                    fed += len(chunk)
        except BrokenPipeError:
            pass  # zstd died: its exit status and stderr tell why
        finally:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

    feeder = threading.Thread(target=feed, name="zstd-feed", daemon=True)
    feeder.start()
    try:
        while chunk := stdout.read(CHUNK):
            out.write(chunk)
            if progress is not None:
                progress(fed, size)
    except BaseException:
        # Nobody reads zstd's output any more (disk full, a cancelling progress callback): zstd
        # would block on its full stdout pipe and the feeder on zstd's full stdin, so the join
        # below would wait forever. Killing zstd ends both (the feeder gets BrokenPipeError).
        proc.kill()
        raise
    finally:
        feeder.join()
        err = proc.stderr.read().decode(errors="replace").strip()
        code = proc.wait()
        stdout.close()
        proc.stderr.close()
    if code != 0 or fed != size:
        raise BuildFailed(f"zstd -{level} failed (exit {code}): {err[-400:]}")
    if progress is not None:
        progress(size, size)


def _compress_module(
    src: Path,
    out: _HashingWriter,
    *,
    size: int,
    level: int,
    threads: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    cctx = zstandard.ZstdCompressor(
        level=level, threads=threads, write_checksum=True, write_content_size=True
    )
    done = 0
    with open(src, "rb") as fin, cctx.stream_writer(out, size=size, write_size=CHUNK) as zw:  # type: ignore[arg-type]
        while chunk := fin.read(4 * CHUNK):
            zw.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, size)


class _HashingWriter:
    """A file for zstd's stream writer that hashes and counts what is written through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, b: bytes) -> int:
        self.hash.update(b)
        self.count += len(b)
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def decompress_sparse(src: Path, dst: Path) -> int:
    """Decompress a zstd file into a sparse ``dst`` (all-zero 64 KiB runs become holes)."""
    dctx = zstandard.ZstdDecompressor()
    zero = bytes(65536)
    total = 0
    tmp = dst.with_name(dst.name + ".part")
    with open(src, "rb") as fin, open(tmp, "wb") as fout, dctx.stream_reader(fin) as r:
        while True:
            buf = r.read(CHUNK)
            if not buf:
                break
            for i in range(0, len(buf), 65536):
                piece = buf[i : i + 65536]
                if piece == zero[: len(piece)]:
                    fout.seek(len(piece), os.SEEK_CUR)
                else:
                    fout.write(piece)
            total += len(buf)
        fout.truncate(total)
    tmp.replace(dst)
    return total
