"""Hostile and broken images: each fails with a clear error naming what was wrong (or, where the
spec says an attack is contained rather than refused, lands inside the build root), and nothing
is ever written outside the build directory.

Every case is an OCI layout pulled through ``source.resolve("oci:...")`` + ``extract_image`` (the
same VerifiedStream / applier path a registry pull takes; registry-specific cases are in
test_oci.py). Layouts let a test store bytes a real registry would refuse (wrong digests).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from unkey_deploy.builder.layers import Limits, extract_image
from unkey_deploy.builder.source import resolve
from unkey_deploy.core.config import BuilderConfig
from unkey_deploy.core.errors import BuildFailed, ImageError, LayerError
from unkey_deploy.testing import images as im
from unkey_deploy.testing.images import E, Layer


@dataclass
class Env:
    tmp: Path
    root: Path
    sentinel: Path
    layout: Path

    @property
    def host_target(self) -> Path:
        """Where escape attempts aim: a file inside the sentinel directory next to the build."""
        return self.sentinel / "PWNED"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("untouched\n")
    root = tmp_path / "build" / "root"
    root.mkdir(parents=True)
    return Env(tmp_path, root, sentinel, tmp_path / "layout")


def snapshot(tmp: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Everything under ``tmp`` except the build dir (and the layout the test wrote)."""
    out: dict[str, tuple[int, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(tmp):
        rel = os.path.relpath(dirpath, tmp)
        if rel.split(os.sep)[0] in ("build", "layout"):
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            if str(p.relative_to(tmp)) in ("build", "layout"):
                continue
            st = p.lstat()
            body: bytes | str = (
                p.read_bytes()
                if stat.S_ISREG(st.st_mode)
                else os.readlink(p)
                if p.is_symlink()
                else ""
            )
            out[str(p.relative_to(tmp))] = (st.st_mode, st.st_mtime_ns, body)
    return out


def layout_of(env: Env, built: im.Built) -> str:
    im.write_layout(env.layout, {"latest": built})
    return f"oci:{env.layout}:latest"


def blob_path(env: Env, digest: str) -> Path:
    return env.layout / "blobs" / "sha256" / digest.split(":")[1]


def simple(entries: list[E], how: str = "gzip") -> im.Built:
    return im.image([Layer.of(entries, how)], entrypoint=["/bin/true"])


def base_and(entries: list[E], how: str = "gzip") -> im.Built:
    base = Layer.of([E("etc/", "dir"), E("etc/passwd", data=b"root:x:0:0::/:/bin/sh\n")])
    return im.image([base, Layer.of(entries, how)], entrypoint=["/bin/true"])


def rewrite_manifest(env: Env, ref: str, edit: Callable[[dict[str, object]], object]) -> str:
    """Change the top manifest of a written layout (its digest in index.json follows)."""
    idx = json.loads((env.layout / "index.json").read_text())
    d = idx["manifests"][0]
    doc = json.loads(blob_path(env, d["digest"]).read_bytes())
    new = edit(doc)
    raw = new if isinstance(new, bytes) else json.dumps(doc).encode()
    dg = "sha256:" + hashlib.sha256(raw).hexdigest()
    blob_path(env, dg).write_bytes(raw)
    d["digest"], d["size"] = dg, len(raw)
    if isinstance(doc, dict) and isinstance(doc.get("mediaType"), str):
        d["mediaType"] = doc["mediaType"]
    (env.layout / "index.json").write_text(json.dumps(idx))
    return ref


# A case builds a layout and returns (image ref, BuilderConfig or None).
Case = Callable[[Env], tuple[str, BuilderConfig | None]]


@dataclass
class Failing:
    build: Case
    error: type[BuildFailed]
    message: str  # must appear in the error message
    entry: str | None = None  # the entry path the message must name (quoted)


def _bomb_gzip(env: Env) -> tuple[str, BuilderConfig]:
    zeros = bytes(200_000)
    return layout_of(env, simple([E(f"z{i}", data=zeros) for i in range(30)])), BuilderConfig(
        max_layer_bytes=1_000_000
    )


def _tampered_blob(env: Env) -> tuple[str, None]:
    b = simple([E("hello", data=b"hello\n")])
    ref = layout_of(env, b)
    layer = b.doc()["layers"][0]
    p = blob_path(env, layer["digest"])
    data = bytearray(p.read_bytes())
    # Same size, different bytes: a valid gzip of a different tar of the same length is hard to
    # make, so flip a byte in the gzip trailer (CRC): the digest check must catch it first.
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    return ref, None


def _replace_layer_blob(env: Env, b: im.Built, new: bytes, size: int | None = None) -> str:
    """Store ``new`` under the layer's digest (descriptor says ``size`` or the original size)."""
    ref = layout_of(env, b)
    layer = b.doc()["layers"][0]
    blob_path(env, layer["digest"]).write_bytes(new)
    if size is not None:

        def edit(doc: dict[str, object]) -> None:
            doc["layers"][0]["size"] = size  # type: ignore[index]

        rewrite_manifest(env, ref, edit)
    return ref


def _truncated(env: Env) -> tuple[str, None]:
    b = simple([E("big", data=os.urandom(50_000))])
    data = b.blobs[b.doc()["layers"][0]["digest"]]
    return _replace_layer_blob(env, b, data[: len(data) // 2]), None


def _oversize(env: Env) -> tuple[str, None]:
    b = simple([E("big", data=os.urandom(50_000))])
    data = b.blobs[b.doc()["layers"][0]["digest"]]
    return _replace_layer_blob(env, b, data, size=len(data) - 100), None


def _wrong_diff_id(env: Env) -> tuple[str, None]:
    la = Layer.of([E("hello", data=b"hello\n")])
    la.diff_id = "sha256:" + "0" * 64
    return layout_of(env, im.image([la], entrypoint=["/x"])), None


def _raw_layer(data: bytes, media_type: str) -> im.Built:
    la = Layer(data, media_type, "sha256:" + hashlib.sha256(data).hexdigest())
    return im.image([la], entrypoint=["/x"])


def _manifest_edit(
    edit: Callable[[dict[str, object]], object], built: im.Built | None = None
) -> Case:
    def build(env: Env) -> tuple[str, None]:
        ref = layout_of(env, built or simple([E("a", data=b"a")]))
        return rewrite_manifest(env, ref, edit), None

    return build


def _set(key: str, value: object) -> Callable[[dict[str, object]], None]:
    def edit(doc: dict[str, object]) -> None:
        doc[key] = value

    return edit


def _layer_mt(doc: dict[str, object]) -> None:
    doc["layers"][0]["mediaType"] = "application/vnd.example.rootfs.squashfs"  # type: ignore[index]


def _layer_digest_algo(doc: dict[str, object]) -> None:
    doc["layers"][0]["digest"] = "md5:" + "0" * 32  # type: ignore[index]


def _neg_size(doc: dict[str, object]) -> None:
    doc["layers"][0]["size"] = -1  # type: ignore[index]


def _config_edit(edit: Callable[[dict[str, object]], None]) -> Case:
    def build(env: Env) -> tuple[str, None]:
        la = Layer.of([E("a", data=b"a")])
        cfg = im.config_json([la], entrypoint=["/x"])
        edit(cfg)
        return layout_of(env, im.image([la], cfg)), None

    return build


def _huge_manifest(env: Env) -> tuple[str, BuilderConfig]:
    b = im.image(
        [Layer.of([E("a", data=b"a")])],
        entrypoint=["/x"],
        manifest_extra={"annotations": {f"k{i}": "v" * 100 for i in range(200)}},
    )
    return layout_of(env, b), BuilderConfig(max_manifest_bytes=8192)


def _no_amd64(env: Env) -> tuple[str, None]:
    idx = im.index(
        {"linux/arm64/v8": im.arch_image("arm64"), "linux/s390x": im.arch_image("s390x")}
    )
    return layout_of(env, idx), None


def _missing_blob(env: Env) -> tuple[str, None]:
    b = simple([E("a", data=b"a")])
    ref = layout_of(env, b)
    blob_path(env, b.doc()["layers"][0]["digest"]).unlink()
    return ref, None


def _too_many_files(env: Env) -> tuple[str, BuilderConfig]:
    return layout_of(env, simple([E(f"f{i}", data=b"x") for i in range(50)])), BuilderConfig(
        max_files=20
    )


def _too_big_file(env: Env) -> tuple[str, BuilderConfig]:
    return layout_of(env, simple([E("big", data=bytes(300_000))])), BuilderConfig(
        max_layer_bytes=100_000
    )


def _truncated_tar(env: Env) -> tuple[str, None]:
    tar = im.tar_bytes([E("big", data=os.urandom(20_000))])[:10_000]
    gz = gzip.compress(tar, mtime=0)
    la = Layer(gz, im.LAYER_MT["gzip"], "sha256:" + hashlib.sha256(tar).hexdigest())
    return layout_of(env, im.image([la], entrypoint=["/x"])), None


def L(entries: list[E], how: str = "gzip") -> Case:
    return lambda env: (layout_of(env, base_and(entries, how)), None)


FAILING: dict[str, Failing] = {
    "dotdot-traversal": Failing(
        L([E("../../sentinel/PWNED", data=b"x")]),
        LayerError,
        "escapes the root",
        "../../sentinel/PWNED",
    ),
    "dotdot-inside-path": Failing(
        L([E("etc/../../../sentinel/PWNED", data=b"x")]),
        LayerError,
        "escapes the root",
        "etc/../../../sentinel/PWNED",
    ),
    "dotdot-dir-entry": Failing(
        L([E("../../sentinel/newdir/", "dir")]), LayerError, "escapes the root"
    ),
    "dotdot-symlink-entry": Failing(
        L([E("../../sentinel/lnk", "symlink", link="/")]), LayerError, "escapes the root"
    ),
    "hardlink-outside-dotdot": Failing(
        L([E("h", "hardlink", link="../../sentinel/keep.txt")]), LayerError, "escapes the root", "h"
    ),
    "hardlink-host-absolute": Failing(
        L([E("h", "hardlink", link="/etc/shadow")]), LayerError, "does not exist", "h"
    ),
    "hardlink-to-symlink": Failing(
        L([E("s", "symlink", link="/etc/passwd"), E("h", "hardlink", link="s")]),
        LayerError,
        "is a symlink",
        "h",
    ),
    "hardlink-missing": Failing(
        L([E("h", "hardlink", link="nope/missing")]), LayerError, "does not exist", "h"
    ),
    "hardlink-through-dir-symlink": Failing(
        L([E("esc", "symlink", link="../../sentinel"), E("h", "hardlink", link="esc/keep.txt")]),
        LayerError,
        "does not exist",
        "h",
    ),
    "hardlink-to-directory": Failing(
        L([E("h", "hardlink", link="etc")]), LayerError, "is a directory", "h"
    ),
    "symlink-loop": Failing(
        L([E("a", "symlink", link="b"), E("b", "symlink", link="a"), E("a/x", data=b"x")]),
        LayerError,
        "too many levels of symbolic links",
        "a/x",
    ),
    "parent-is-file": Failing(
        L([E("etc/passwd/x", data=b"x")]), LayerError, "is not a directory", "etc/passwd/x"
    ),
    "whiteout-dotdot": Failing(
        L([E("etc/.wh...")]), LayerError, "invalid whiteout target", "etc/.wh..."
    ),
    "opaque-in-escape-path": Failing(
        L([E("../../sentinel/.wh..wh..opq")]), LayerError, "escapes the root"
    ),
    "whiteout-in-escape-path": Failing(
        L([E("../sentinel/.wh.keep.txt")]), LayerError, "escapes the root"
    ),
    "tar-bomb-file-size": Failing(_too_big_file, LayerError, "over the 100000-byte limit", "big"),
    "too-many-files": Failing(_too_many_files, LayerError, "too many entries"),
    "gzip-bomb": Failing(_bomb_gzip, LayerError, "exceeds the 1000000-byte limit"),
    "wrong-blob-digest": Failing(_tampered_blob, ImageError, "digest mismatch"),
    "wrong-diff-id": Failing(_wrong_diff_id, LayerError, "diff_id mismatch"),
    "truncated-blob": Failing(_truncated, ImageError, "truncated"),
    "oversize-blob": Failing(_oversize, ImageError, "larger than its descriptor"),
    "missing-blob": Failing(_missing_blob, ImageError, "missing from the layout"),
    "huge-manifest": Failing(_huge_manifest, ImageError, "over the 8192-byte limit"),
    "unknown-manifest-media-type": Failing(
        _manifest_edit(_set("mediaType", "application/vnd.example.manifest+json")),
        ImageError,
        "unsupported manifest media type",
    ),
    "schema1-manifest": Failing(_manifest_edit(_set("schemaVersion", 1)), ImageError, "schema 1"),
    "unknown-layer-media-type": Failing(
        _manifest_edit(_layer_mt),
        ImageError,
        "unsupported media type 'application/vnd.example.rootfs.squashfs'",
    ),
    "manifest-not-json": Failing(
        _manifest_edit(lambda doc: b"\x00not json{"), ImageError, "not valid JSON"
    ),
    "missing-config": Failing(
        _manifest_edit(lambda doc: doc.pop("config")), ImageError, "has no config"
    ),
    "unsupported-digest-algorithm": Failing(
        _manifest_edit(_layer_digest_algo), ImageError, "unsupported digest"
    ),
    "negative-size": Failing(_manifest_edit(_neg_size), ImageError, "non-negative integer"),
    "index-without-amd64": Failing(
        _no_amd64, ImageError, "no linux/amd64 image (platforms: linux/arm64, linux/s390x)"
    ),
    "config-arm64": Failing(
        _config_edit(lambda c: c.update(architecture="arm64")), ImageError, "not linux/amd64"
    ),
    "diff-ids-count": Failing(
        _config_edit(lambda c: c["rootfs"]["diff_ids"].append("sha256:" + "1" * 64)),
        ImageError,
        "2 diff_ids but the manifest has 1 layers",
    ),  # type: ignore[index]
    "corrupt-gzip": Failing(
        lambda env: (
            layout_of(env, _raw_layer(b"\x1f\x8b\x08\x00" + os.urandom(2000), im.LAYER_MT["gzip"])),
            None,
        ),
        LayerError,
        "corrupt or truncated compressed data",
    ),
    "zstd-garbage": Failing(
        lambda env: (
            layout_of(env, _raw_layer(b"\x28\xb5\x2f\xfd" + os.urandom(2000), im.LAYER_MT["zstd"])),
            None,
        ),
        LayerError,
        "corrupt zstd data",
    ),
    "not-tar": Failing(
        lambda env: (
            layout_of(env, _raw_layer(b"hello, I am not a tarball " * 100, im.LAYER_MT[""])),
            None,
        ),
        LayerError,
        "not a valid tar stream",
    ),
    "gzip-type-plain-data": Failing(
        lambda env: (
            layout_of(env, _raw_layer(im.tar_bytes([E("a", data=b"a")]), im.LAYER_MT["gzip"])),
            None,
        ),
        LayerError,
        "layer data is not gzip",
    ),
    "truncated-tar-in-valid-gzip": Failing(_truncated_tar, LayerError, "layer sha256:"),
}


@pytest.mark.parametrize("name", sorted(FAILING))
def test_hostile_image_fails_clearly_and_writes_nothing_outside(env: Env, name: str) -> None:
    case = FAILING[name]
    before = snapshot(env.tmp)
    ref, cfg = case.build(env)
    cfg = cfg or BuilderConfig()
    with pytest.raises(BuildFailed) as info, resolve(ref, config=cfg) as img:
        extract_image(img, env.root, Limits.from_config(cfg))
    err = info.value
    assert isinstance(err, case.error), f"{type(err).__name__}: {err}"
    assert case.message in str(err), str(err)
    if case.error is LayerError:
        # The message names the layer digest, and the entry when one is to blame.
        assert str(err).startswith("layer sha256:"), str(err)
    if case.entry is not None:
        assert f'entry "{case.entry}"' in str(err), str(err)
    assert snapshot(env.tmp) == before
    assert not env.host_target.exists()
    assert not (env.tmp / "PWNED").exists()
    assert not (env.tmp / "build" / "PWNED").exists()


def test_at_least_25_distinct_failing_cases() -> None:
    assert len(FAILING) >= 25


# Attacks the spec contains instead of refusing (real images need absolute symlinks and writes
# through in-image symlinks): the build succeeds and everything lands inside the root.
def _abs_dir_symlink(env: Env) -> list[E]:
    return [E("esc", "symlink", link=str(env.sentinel)), E("esc/PWNED", data=b"x")]


CONTAINED: dict[str, tuple[Callable[[Env], list[E]], Callable[[Env], Path]]] = {
    "absolute-path-entry": (lambda env: [E("/PWNED", data=b"x")], lambda env: env.root / "PWNED"),
    "absolute-host-path-entry": (
        lambda env: [E(str(env.host_target), data=b"x")],
        lambda env: env.root / str(env.host_target).lstrip("/"),
    ),
    "symlink-then-write-through": (
        lambda env: [E("lnk", "symlink", link=str(env.host_target)), E("lnk", data=b"x")],
        lambda env: env.root / "lnk",
    ),
    "dir-symlink-escape-absolute": (
        _abs_dir_symlink,
        lambda env: env.root / str(env.sentinel).lstrip("/") / "PWNED",
    ),
    "dir-symlink-escape-relative": (
        lambda env: [
            E("esc", "symlink", link="../../../../../../../.."),
            E("esc/PWNED", data=b"x"),
        ],
        lambda env: env.root / "PWNED",
    ),
    "nested-symlink-chain-escape": (
        lambda env: [
            E("a", "symlink", link="b/.."),
            E("b", "symlink", link="/../../c"),
            E("c/", "dir"),
            E("a/c/PWNED", data=b"x"),
        ],
        lambda env: env.root / "c" / "PWNED",
    ),
    "whiteout-through-symlink": (
        lambda env: [E("esc", "symlink", link=str(env.sentinel)), E("esc/.wh.keep.txt")],
        lambda env: env.root / "esc",
    ),
}


@pytest.mark.parametrize("name", sorted(CONTAINED))
def test_escape_attempts_are_contained_inside_root(env: Env, name: str) -> None:
    entries, landed = CONTAINED[name]
    before = snapshot(env.tmp)
    ref = layout_of(env, base_and(entries(env)))
    with resolve(ref) as img:
        extract_image(img, env.root)
    assert snapshot(env.tmp) == before
    assert not env.host_target.exists()
    assert (env.sentinel / "keep.txt").read_text() == "untouched\n"
    target = landed(env)
    assert os.path.lexists(target), f"expected the write to land at {target}"
    assert Path(os.path.realpath(target.parent)).is_relative_to(env.root)


def test_devices_and_fifos_are_skipped_and_reported(env: Env) -> None:
    before = snapshot(env.tmp)
    ref = layout_of(
        env,
        base_and(
            [E("dev/", "dir"), E("dev/sda", "block"), E("dev/mem", "char"), E("run.fifo", "fifo")]
        ),
    )
    lines: list[str] = []
    with resolve(ref) as img:
        stats = extract_image(img, env.root, log=lines.append)
    assert sorted(stats.skipped_devices) == ["/dev/mem", "/dev/sda", "/run.fifo"]
    assert not os.path.lexists(env.root / "dev" / "sda")
    assert not os.path.lexists(env.root / "dev" / "mem")
    assert not os.path.lexists(env.root / "run.fifo")
    assert any("skipped device node or FIFO /dev/mem" in line for line in lines)
    assert snapshot(env.tmp) == before


def test_zstd_bomb_stops_at_limit(env: Env) -> None:
    tar = im.tar_bytes([E(f"z{i}", data=bytes(100_000)) for i in range(40)])
    data = zstandard.ZstdCompressor().compress(tar)
    assert len(data) < 20_000
    la = Layer(data, im.LAYER_MT["zstd"], "sha256:" + hashlib.sha256(tar).hexdigest())
    ref = layout_of(env, im.image([la], entrypoint=["/x"]))
    with pytest.raises(LayerError, match="exceeds the 500000-byte limit"), resolve(ref) as img:
        extract_image(img, env.root, Limits(max_layer_bytes=500_000))
    # Stopped early: far less than the 4 MB the bomb expands to was written.
    written = sum(p.stat().st_size for p in env.root.rglob("*") if p.is_file())
    assert written <= 500_000


@pytest.mark.parametrize("name", sorted(im.hostile_images()))
def test_shared_hostile_images_fail(env: Env, name: str) -> None:
    """The set other areas (CLI, service) reuse stays hostile, through the same checks."""
    built, fragment = im.hostile_images()[name]
    before = snapshot(env.tmp)
    with (
        pytest.raises(BuildFailed, match=re.escape(fragment)),
        resolve(layout_of(env, built)) as img,
    ):
        extract_image(img, env.root)
    assert snapshot(env.tmp) == before
