"""Layer applier limits that bomb or crash-style layers hit (found by probing the applier).

Each case is a tiny tar that, before these limits, either wrote far more than the image holds
(sparse entries), crashed the build with a traceback instead of a named error (uid overflow), or
left a tree the cleanup could not remove (``shutil.rmtree`` recursion on 1,500 nested dirs).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from unkey_deploy.builder.layers import MAX_DEPTH, Limits, apply_layer
from unkey_deploy.core.errors import LayerError

PLAIN = "application/vnd.oci.image.layer.v1.tar"


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _apply(tar: bytes, root: Path, limits: Limits) -> None:
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    apply_layer(io.BytesIO(tar), root, media_type=PLAIN, layer_digest=digest, limits=limits)


def _du(root: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in root.rglob("*"))


def test_sparse_entries_count_their_full_size(tmp_path: Path) -> None:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for i in range(30):
        ti = tarfile.TarInfo(f"sparse{i}")
        ti.pax_headers = {"GNU.sparse.size": str(10_000_000), "GNU.sparse.map": "0,0"}
        members.append((ti, None))
    tar = _tar(members)
    assert len(tar) < 100_000  # a few KiB of headers ...
    limits = Limits(max_layer_bytes=50_000_000, max_image_bytes=50_000_000, max_files=1000)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(LayerError, match=r'entry "sparse5": files add up to more than'):
        _apply(tar, root, limits)  # ... must not become 300 MB of files
    assert _du(root) <= 60_000_000


def test_sparse_bytes_count_against_later_layers() -> None:
    from unkey_deploy.builder.layers import LayerStats

    left = Limits(max_image_bytes=1000).minus(LayerStats(tar_bytes=10, file_bytes=900))
    assert left.max_image_bytes == 100


@pytest.mark.parametrize("field", ["uid", "gid"])
def test_out_of_range_owner_is_a_named_layer_error(tmp_path: Path, field: str) -> None:
    ti = tarfile.TarInfo("bigid")
    setattr(ti, field, 2**40)
    ti.size = 1
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(LayerError, match=r'entry "bigid": uid/gid .* out of range'):
        _apply(_tar([(ti, b"x")]), root, Limits())


def test_deep_nesting_is_refused_and_the_scratch_tree_stays_removable(tmp_path: Path) -> None:
    ti = tarfile.TarInfo("/".join(["d"] * 1500))
    ti.size = 1
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(LayerError, match=f"deeper than {MAX_DEPTH} directories"):
        _apply(_tar([(ti, b"x")]), root, Limits())
    shutil.rmtree(root)  # the build's cleanup must work on whatever was left
    assert not root.exists()


def test_deep_nesting_through_symlinks_is_refused(tmp_path: Path) -> None:
    """Each entry is shallow, but a symlink to the deepest dir lets the next one go deeper."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    prev = ""
    for i in range(40):
        d = tarfile.TarInfo(f"{prev}/" + "/".join(["n"] * 10) if prev else "/".join(["n"] * 10))
        d.type = tarfile.DIRTYPE
        members.append((d, None))
        link = tarfile.TarInfo(f"s{i}")
        link.type, link.linkname = tarfile.SYMTYPE, "/" + d.name
        members.append((link, None))
        prev = f"s{i}"
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(LayerError, match="deeper than"):
        _apply(_tar(members), root, Limits())
    shutil.rmtree(root)


def test_depth_just_under_the_cap_is_accepted(tmp_path: Path) -> None:
    ti = tarfile.TarInfo("/".join(["d"] * (MAX_DEPTH - 1)) + "/f")
    ti.size = 2
    root = tmp_path / "root"
    root.mkdir()
    _apply(_tar([(ti, b"ok")]), root, Limits())
    assert (root.joinpath(*(["d"] * (MAX_DEPTH - 1))) / "f").read_bytes() == b"ok"


def _meta_header_tar(kind: bytes, payload: bytes) -> bytes:
    """A tar whose first member is a pax (x) or GNU long-name (L) header carrying ``payload``,
    followed by one small file: what tarfile itself reads whole into memory."""
    head = tarfile.TarInfo("././@Meta")
    head.type, head.size = kind, len(payload)
    f = tarfile.TarInfo("a")
    f.size = 1
    pad = b"\0" * ((512 - len(payload) % 512) % 512)
    return (head.tobuf(format=tarfile.USTAR_FORMAT) + payload + pad
            + f.tobuf(format=tarfile.USTAR_FORMAT) + b"a" + b"\0" * 511 + b"\0" * 1024)  # fmt: skip


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME])
def test_an_oversized_pax_or_long_name_header_is_refused_before_it_is_read(
    tmp_path: Path, kind: bytes
) -> None:
    """tarfile reads a pax or GNU long-name header whole and parses it in memory: a 1.3 MB
    gzip'd layer with a 300 MB pax record took the worker to 2 GB of RSS (and the 2 GiB layer
    limit allowed ~14 GB). Such headers are refused past 1 MiB (real ones hold a path, a few
    attributes or xattrs: kilobytes)."""
    body = b"x" * (2 << 20)
    record = b" comment=" + body + b"\n"
    payload = str(len(record) + 8).encode() + record if kind != tarfile.GNUTYPE_LONGNAME else body
    with pytest.raises(LayerError, match=r"header of \d+ bytes, over the 1048576-byte limit"):
        _apply(_meta_header_tar(kind, payload), tmp_path, Limits())
    assert not (tmp_path / "a").exists()
