"""Layer applier semantics: replacements, whiteouts, opaque dirs, links, limits, reproducibility,
and umoci (the reference unpacker installed here) as an oracle for the resulting tree."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from unkey_deploy.builder.layers import EPOCH, Limits, apply_layer, extract_image
from unkey_deploy.builder.source import resolve
from unkey_deploy.core.errors import LayerError
from unkey_deploy.testing import images as im
from unkey_deploy.testing.images import E, Layer


def apply(root: Path, entries: list[E], how: str = "gzip", **kw: object) -> object:
    la = Layer.of(entries, how)
    return apply_layer(
        io.BytesIO(la.data),
        root,
        media_type=la.media_type,
        layer_digest=im.sha(la.data),
        diff_id=la.diff_id,
        **kw,  # type: ignore[arg-type]
    )


def listing(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), "")
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("f", stat.S_IMODE(st.st_mode), p.read_bytes())
            else:
                out[rel] = ("special", st.st_mode, "")
    return out


def test_replacements_between_layers(tmp_path: Path) -> None:
    apply(
        tmp_path,
        [
            E("f-to-dir", data=b"f"),
            E("dir-to-f/", "dir"),
            E("dir-to-f/child", data=b"c"),
            E("dir-to-link/", "dir"),
            E("dir-to-link/child", data=b"c"),
            E("link-to-f", "symlink", link="/etc/passwd"),
            E("keep/", "dir"),
            E("keep/a", data=b"a"),
        ],
    )
    apply(
        tmp_path,
        [
            E("f-to-dir/", "dir"),
            E("f-to-dir/x", data=b"x"),
            E("dir-to-f", data=b"now a file"),
            E("dir-to-link", "symlink", link="keep"),
            E("link-to-f", data=b"regular"),
            E("keep/", "dir", mode=0o700),  # re-declaring a dir keeps its children
        ],
    )
    assert (tmp_path / "f-to-dir/x").read_bytes() == b"x"
    assert (tmp_path / "dir-to-f").read_bytes() == b"now a file"
    assert os.readlink(tmp_path / "dir-to-link") == "keep"
    assert not (tmp_path / "link-to-f").is_symlink()
    assert (tmp_path / "link-to-f").read_bytes() == b"regular"
    assert (tmp_path / "keep/a").read_bytes() == b"a"
    assert stat.S_IMODE((tmp_path / "keep").stat().st_mode) == 0o700


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_dir_keeps_entries_of_its_own_layer(tmp_path: Path, marker_first: bool) -> None:
    apply(
        tmp_path,
        [E("d/", "dir"), E("d/old", data=b"o"), E("d/sub/", "dir"), E("d/sub/x", data=b"x")],
    )
    new = [E("d/new", data=b"n"), E("d/sub/", "dir"), E("d/sub/y", data=b"y")]
    marker = [E("d/.wh..wh..opq")]
    st = apply(tmp_path, [E("d/", "dir"), *(marker + new if marker_first else new + marker)])
    assert sorted(os.listdir(tmp_path / "d")) == ["new", "sub"]
    assert sorted(os.listdir(tmp_path / "d/sub")) == ["y"]
    assert st.opaque_dirs == 1  # type: ignore[attr-defined]


def test_whiteouts(tmp_path: Path) -> None:
    apply(tmp_path, [E("a/", "dir"), E("a/b/", "dir"), E("a/b/c", data=b"c"), E("x", data=b"x")])
    st = apply(tmp_path, [E("a/.wh.b"), E(".wh.x"), E(".wh.never-existed"), E("nodir/.wh.y")])
    assert os.listdir(tmp_path / "a") == []
    assert not (tmp_path / "x").exists()
    assert st.whiteouts == 2  # type: ignore[attr-defined]


def test_absolute_symlinks_in_parents_resolve_inside_the_image(tmp_path: Path) -> None:
    # The common real-image case: /var/run -> /run, later layers write var/run/x.
    apply(tmp_path, [E("run/", "dir"), E("var/", "dir"), E("var/run", "symlink", link="/run")])
    apply(tmp_path, [E("var/run/app.pid", data=b"1\n")])
    assert (tmp_path / "run/app.pid").read_bytes() == b"1\n"
    assert os.readlink(tmp_path / "var/run") == "/run"


def test_hardlinks_share_inode_and_follow_parent_symlinks(tmp_path: Path) -> None:
    apply(
        tmp_path,
        [
            E("usr/", "dir"),
            E("usr/lib/", "dir"),
            E("usr/lib/libx.so", data=b"elf"),
            E("lib", "symlink", link="usr/lib"),
            E("lib/alias.so", "hardlink", link="usr/lib/libx.so"),
            E("again", "hardlink", link="lib/libx.so"),
        ],
    )
    ino = (tmp_path / "usr/lib/libx.so").stat().st_ino
    assert (tmp_path / "usr/lib/alias.so").stat().st_ino == ino
    assert (tmp_path / "again").stat().st_ino == ino


def test_mtimes_are_clamped_and_reproducible(tmp_path: Path) -> None:
    future = 4_000_000_000
    entries = [
        E("d/", "dir", mtime=1_500_000_000),
        E("d/f", data=b"f", mtime=future),
        E("implicit/deep/file", data=b"x", mtime=1_000),
        E("l", "symlink", link="d/f", mtime=future),
    ]
    for r in ("a", "b"):
        (tmp_path / r).mkdir()
        apply(tmp_path / r, entries)
        apply(tmp_path / r, [E("d/g", data=b"g", mtime=1_234)])
    a, b = tmp_path / "a", tmp_path / "b"
    assert int((a / "d").stat().st_mtime) == 1_500_000_000  # fixed after children were added
    assert int((a / "d/f").stat().st_mtime) == EPOCH  # clamped
    assert int((a / "l").lstat().st_mtime) == EPOCH
    assert int((a / "implicit").stat().st_mtime) == EPOCH  # directories the tar never declared
    assert int((a / "implicit/deep/file").stat().st_mtime) == 1_000
    for p in a.rglob("*"):
        q = b / p.relative_to(a)
        assert p.lstat().st_mtime_ns == q.lstat().st_mtime_ns, p
        assert p.lstat().st_mode == q.lstat().st_mode, p


def test_limits_apply_to_the_whole_image(tmp_path: Path) -> None:
    l1 = Layer.of([E(f"a{i}", data=b"x") for i in range(15)])
    l2 = Layer.of([E(f"b{i}", data=b"x") for i in range(15)])
    im.write_layout(tmp_path / "layout", {"t": im.image([l1, l2], entrypoint=["/x"])})
    (tmp_path / "root").mkdir()
    # Each layer alone fits in 20 entries; together they do not.
    with (
        resolve(f"oci:{tmp_path / 'layout'}:t") as img,
        pytest.raises(LayerError, match="too many entries") as info,
    ):
        extract_image(img, tmp_path / "root", Limits(max_files=20))
    assert info.value.details["layer"] == im.sha(l2.data)


def test_apply_as_plain_tar_and_no_diff_id(tmp_path: Path) -> None:
    la = Layer.of([E("a", data=b"a")], "")
    st = apply_layer(
        io.BytesIO(la.data), tmp_path, media_type=la.media_type, layer_digest=im.sha(la.data)
    )
    assert st.files == 1 and st.tar_bytes == len(la.data)
    with pytest.raises(LayerError, match="unsupported layer media type"):
        apply_layer(io.BytesIO(la.data), tmp_path, media_type="text/plain", layer_digest="sha256:x")


def test_same_tree_as_umoci(tmp_path: Path) -> None:
    """umoci is the reference unpacker: our tree must match it (minus device nodes we skip)."""
    im.write_layout(tmp_path / "layout", {"t": im.multilayer_image()})
    subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp_path / 'layout'}:t", str(tmp_path / "bundle")],
        check=True,
        capture_output=True,
    )
    (tmp_path / "ours").mkdir()
    with resolve(f"oci:{tmp_path / 'layout'}:t") as img:
        extract_image(img, tmp_path / "ours")
    theirs = {k: v for k, v in listing(tmp_path / "bundle/rootfs").items() if v[0] != "special"}
    assert listing(tmp_path / "ours") == theirs


def test_apply_layer_reports_progress_up_to_the_blob_size(tmp_path: Path) -> None:
    la = Layer.of([E(f"f{i}", data=b"x" * 1000) for i in range(20)], "gzip")
    calls: list[tuple[int, int]] = []
    apply_layer(
        io.BytesIO(la.data),
        tmp_path,
        media_type=la.media_type,
        layer_digest=im.sha(la.data),
        size=len(la.data),
        progress=lambda done, total: calls.append((done, total)),
    )
    # BytesIO has no bytes_read: done counts uncompressed tar bytes, monotonic, ends at the total
    assert len(calls) >= 20 and all(t == len(la.data) for _, t in calls)
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and dones[-1] > 20 * 1000


def test_hardlink_header_metadata_never_changes_the_shared_inode(tmp_path: Path) -> None:
    """A hardlink is a second name of the target's inode, whose owner/mode/mtime came with the
    target's entry. The link header's own fields are ignored (POSIX LNKTYPE, GNU tar, umoci: see
    test_same_tree_as_umoci), whichever layer the target came from, so a link entry cannot make
    a lower layer's file setuid or re-own it; both names show the target's metadata."""
    apply(tmp_path, [E("bin/", "dir"), E("bin/tool", data=b"#!x", mode=0o755, uid=7, gid=8,
                                         mtime=1_500_000_000)])  # fmt: skip
    apply(
        tmp_path,
        [E("bin/alias", "hardlink", link="bin/tool", mode=0o4777, uid=1000, gid=2000,
           mtime=1_600_000_000),
         E("also", "hardlink", link="bin/alias", mode=0o600, mtime=4_000_000_000)],
    )  # fmt: skip
    names = [tmp_path / "bin/tool", tmp_path / "bin/alias", tmp_path / "also"]
    sts = [p.lstat() for p in names]
    assert len({st.st_ino for st in sts}) == 1 and sts[0].st_nlink == 3
    for st in sts:
        assert stat.S_IMODE(st.st_mode) == 0o755
        assert (st.st_uid, st.st_gid) == (7, 8)
        assert st.st_mtime == 1_500_000_000
    assert all(p.read_bytes() == b"#!x" for p in names)


def test_a_whiteout_hides_only_lower_layers_like_umoci(tmp_path: Path) -> None:
    """OCI image spec (layer.md, Whiteouts): "Whiteout files MUST only apply to resources in
    lower/parent layers. Files that are present in the same layer as a whiteout file can only
    be hidden by whiteout files in subsequent layers." A layer holding both ``a/new`` and
    ``a/.wh.new`` keeps ``a/new`` (umoci, the reference unpacker, agrees); it used to be
    deleted when the whiteout came after it in the tar."""
    lower = im.Layer.of([E("a/", "dir"), E("a/old", data=b"old")])
    upper = im.Layer.of([E("a/new", data=b"new"), E("a/.wh.new"), E("a/.wh.old")])
    im.write_layout(tmp_path / "layout", {"t": im.image([lower, upper], entrypoint=["/x"])})
    subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp_path / 'layout'}:t", str(tmp_path / "bundle")],
        check=True,
        capture_output=True,
    )
    (tmp_path / "ours").mkdir()
    with resolve(f"oci:{tmp_path / 'layout'}:t") as img:
        extract_image(img, tmp_path / "ours")
    assert (tmp_path / "ours/a/new").read_bytes() == b"new"
    assert not (tmp_path / "ours/a/old").exists()
    assert listing(tmp_path / "ours") == listing(tmp_path / "bundle/rootfs")


def test_aufs_metadata_entries_are_skipped_like_umoci(tmp_path: Path) -> None:
    """Layers written by Docker's old aufs driver carry ``.wh..wh.aufs``, ``.wh..wh.plnk/`` and
    ``.wh..wh.orph/``: metadata, not whiteouts (moby's unpacker skips them, umoci ignores them
    as well). Such an image must extract; it was refused with "invalid whiteout target"."""
    lower = im.Layer.of([E("a/", "dir"), E("a/old", data=b"old")])
    upper = im.Layer.of(
        [
            E(".wh..wh.aufs", data=b""),
            E(".wh..wh.plnk/", "dir"),
            E(".wh..wh.orph/", "dir"),
            E("a/new", data=b"new"),
        ]
    )
    im.write_layout(tmp_path / "layout", {"t": im.image([lower, upper], entrypoint=["/x"])})
    subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp_path / 'layout'}:t", str(tmp_path / "bundle")],
        check=True,
        capture_output=True,
    )
    (tmp_path / "ours").mkdir()
    with resolve(f"oci:{tmp_path / 'layout'}:t") as img:
        extract_image(img, tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours/a")) == ["new", "old"]
    assert listing(tmp_path / "ours") == listing(tmp_path / "bundle/rootfs")


def test_repeated_opaque_markers_do_not_rescan_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ``.wh..wh..opq`` listed (and lstat'ed) its whole directory again: a 142 KB layer
    of 20,000 files and 200 markers took 52 s to apply, and the entry limit allowed hours per
    layer. A directory made opaque once in a layer holds nothing of lower layers any more
    (below it, too), so later markers there are no-ops: the directory is listed once."""
    apply(tmp_path, [E("d/", "dir"), E("d/old", data=b"o"), E("d/sub/", "dir"),
                     E("d/sub/old", data=b"o")])  # fmt: skip
    listed: list[str] = []
    real_iterdir = Path.iterdir

    def counting_iterdir(self: Path) -> Iterator[Path]:
        listed.append(str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", counting_iterdir)
    entries = [E("d/", "dir"), E("d/sub/", "dir"), *[E(f"d/f{i}", data=b"") for i in range(50)]]
    markers = [E("d/.wh..wh..opq"), E("d/sub/.wh..wh..opq")] * 50
    apply(tmp_path, [*entries, *markers, E("d/sub/new", data=b"n")])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "d")) == sorted(["sub", *(f"f{i}" for i in range(50))])
    assert os.listdir(tmp_path / "d/sub") == ["new"]
    assert listed.count(str(tmp_path / "d")) == 1
    assert listed.count(str(tmp_path / "d/sub")) <= 1


def test_directory_times_are_never_set_through_a_replaced_parent(tmp_path: Path) -> None:
    """The final pass restoring directory mtimes looked paths up from the root, following
    whatever their parents had become: a layer that made ``x/victim/`` and then replaced ``x``
    by a symlink to a host directory set that host directory's mtime (outside the root)."""
    host = tmp_path / "host"
    (host / "victim").mkdir(parents=True)
    os.utime(host / "victim", (2_000_000_000, 2_000_000_000))
    root = tmp_path / "root"
    root.mkdir()
    apply(root, [E("x/", "dir"), E("x/victim/", "dir", mtime=1_000_000_000),
                 E("x", "symlink", link=str(host))], "")  # fmt: skip
    assert os.readlink(root / "x") == str(host)
    assert (host / "victim").stat().st_mtime == 2_000_000_000  # untouched


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_directory_replaced_later_in_its_own_layer_applies(tmp_path: Path, kind: str) -> None:
    """``y/``, ``y/z/``, then ``y`` as a file (or a dangling symlink) is a valid layer; the
    final mtime pass raised NotADirectoryError/ELOOP on ``y/z`` (the build failed with an
    internal error and was retried in vain)."""
    last = E("y", data=b"file now") if kind == "file" else E("y", "symlink", link="y")
    apply(tmp_path, [E("y/", "dir"), E("y/z/", "dir"), last])
    if kind == "file":
        assert (tmp_path / "y").read_bytes() == b"file now"
    else:
        assert os.readlink(tmp_path / "y") == "y"
