"""rootfs.ext4: reproducible bytes, fsck-clean, contents and ownership, zstd round trip."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from unkey_deploy.builder.rootfs import compress, decompress_sparse, make_rootfs, sha256_file
from unkey_deploy.core.errors import BuildFailed

pytestmark = pytest.mark.root


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # keeps owners
    return dst


def test_same_tree_twice_gives_identical_bytes(
    tmp_path: Path, make_tree: Callable[..., Path]
) -> None:
    base = make_tree(tmp_path / "base")
    (base / "app/owned").write_text("x")
    os.chown(base / "app/owned", 1000, 1000)
    a = make_rootfs(_copy(base, tmp_path / "a"), tmp_path / "a.ext4", seed="sha256:abc|opts")
    time.sleep(1.1)  # the copies' ctimes differ (mkfs -d copies ctime; the build must pin it)
    b = make_rootfs(_copy(base, tmp_path / "b"), tmp_path / "b.ext4", seed="sha256:abc|opts")
    assert a.sha256 == b.sha256 == sha256_file(tmp_path / "b.ext4")
    c = make_rootfs(_copy(base, tmp_path / "c"), tmp_path / "c.ext4", seed="sha256:other")
    assert c.sha256 != a.sha256 and c.uuid != a.uuid
    fsck = subprocess.run(
        ["e2fsck", "-fn", str(tmp_path / "a.ext4")], capture_output=True, check=False
    )
    assert fsck.returncode == 0
    ls = subprocess.run(["debugfs", "-R", "ls -l /app", str(tmp_path / "a.ext4")],
                        capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert any("owned" in line and " 1000 " in line for line in ls.splitlines())
    za = compress(tmp_path / "a.ext4", tmp_path / "a.zst", level=3, threads=2)
    zb = compress(tmp_path / "b.ext4", tmp_path / "b.zst", level=3, threads=2)
    assert za.sha256 == zb.sha256 and za.bytes < a.bytes
    assert decompress_sparse(tmp_path / "a.zst", tmp_path / "back.ext4") == a.bytes
    assert sha256_file(tmp_path / "back.ext4") == a.sha256
    assert os.stat(tmp_path / "back.ext4").st_blocks * 512 < a.bytes  # holes kept


def test_rootfs_and_compress_report_progress(
    tmp_path: Path, make_tree: Callable[..., Path]
) -> None:
    from unkey_deploy.builder.rootfs import ROOTFS_STEPS

    steps: list[tuple[int, int]] = []
    info = make_rootfs(make_tree(tmp_path / "t"), tmp_path / "r.ext4", seed="s",
                       progress=lambda d, t: steps.append((d, t)))  # fmt: skip
    n = len(ROOTFS_STEPS)
    assert steps == [(i, n) for i in range(n + 1)]
    seen: list[tuple[int, int]] = []
    z = compress(tmp_path / "r.ext4", tmp_path / "r.zst", progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, info.bytes) and seen[-1] == (info.bytes, info.bytes)
    assert (
        z.sha256 == sha256_file(tmp_path / "r.zst")
        and z.bytes == (tmp_path / "r.zst").stat().st_size
    )


def test_compress_without_the_zstd_cli_uses_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both compressors write a checked frame with the content size that decompresses back."""
    import zstandard

    from unkey_deploy.builder import rootfs

    raw = tmp_path / "x.img"
    raw.write_bytes(os.urandom(300_000) + bytes(3_000_000) + b"end")
    cli = compress(raw, tmp_path / "cli.zst")
    monkeypatch.setattr(rootfs.shutil, "which", lambda _name: None)
    mod = compress(raw, tmp_path / "mod.zst", progress=lambda d, t: None)
    for z in (cli, mod):
        data = Path(z.path).read_bytes()
        assert z.sha256 == sha256_file(Path(z.path)) and z.bytes == len(data)
        assert zstandard.get_frame_parameters(data).content_size == raw.stat().st_size
        assert zstandard.ZstdDecompressor().decompress(data) == raw.read_bytes()


def test_compress_failing_mid_stream_raises_instead_of_hanging(tmp_path: Path) -> None:
    """Writing the output can fail half way (disk full) and a progress callback can raise (a
    cancelled build): compress() must raise that error promptly, stop zstd and leave no file,
    not wait forever on zstd's full pipes."""
    import shutil
    import threading

    assert shutil.which("zstd") is not None  # the CLI path is the one with pipes
    raw = tmp_path / "x.img"
    with raw.open("wb") as f:  # incompressible: zstd's output fills its pipe at once
        for _ in range(32):
            f.write(os.urandom(1 << 20))

    class Cancelled(Exception):
        pass

    def cancel(done: int, _total: int) -> None:
        if done > 0:
            raise Cancelled

    got: list[BaseException] = []

    def run() -> None:
        try:
            compress(raw, tmp_path / "x.zst", progress=cancel)
        except BaseException as e:  # handed to the test thread
            got.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "compress() hung after its output failed"
    assert len(got) == 1 and isinstance(got[0], Cancelled), got
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.img"]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs of the test's own (the builder's work dir may well be one)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_the_image_size_does_not_depend_on_the_work_dirs_filesystem(tmpfs: Path) -> None:
    """The ext4 is sized from the tree's allocated bytes, but a tmpfs (or XFS) allocates no
    block to a directory or a long symlink, which ext4 does (one 4 KiB block each): a tree of
    many of them built on a tmpfs ran out of space in mkfs ("Could not allocate block")."""
    tree = tmpfs / "tree"
    tree.mkdir()
    for i in range(2500):
        (tree / f"d{i}").mkdir()
        (tree / f"l{i}").symlink_to(f"/usr/lib/x86_64-linux-gnu/a/target/longer/than/60/chars/{i}")
    info = make_rootfs(tree, tmpfs / "out.ext4", seed="sha256:abc|opts")
    fsck = subprocess.run(["e2fsck", "-fn", info.path], capture_output=True, check=False)
    assert fsck.returncode == 0
    ls = subprocess.run(["debugfs", "-R", "ls /", info.path], capture_output=True, text=True,
                        check=True).stdout  # fmt: skip
    assert "l2499" in ls and "d2499" in ls


def test_a_failing_e2fsck_says_what_it_found(
    tmp_path: Path, make_tree: Callable[..., Path]
) -> None:
    """e2fsck reports its findings on stdout and only its version banner on stderr: the
    BuildFailed message carried just "e2fsck 1.47.0 (5-Feb-2023)", not what was wrong."""
    from unkey_deploy.builder import rootfs

    info = make_rootfs(make_tree(tmp_path / "t"), tmp_path / "t.ext4", seed="s")
    subprocess.run(["debugfs", "-w", "-R", "clri /etc", info.path], check=True,
                   capture_output=True)  # fmt: skip
    with pytest.raises(
        BuildFailed, match=r"(?s)e2fsck -fn failed \(exit 4\): .*deleted/unused inode"
    ):
        rootfs._run(["e2fsck", "-fn", info.path], dict(os.environ), "e2fsck -fn")
