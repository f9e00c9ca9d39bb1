"""Builder test fixtures: the compiled init and small busybox-based image trees."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from unkey_deploy.builder.vminit import build_init

BUSYBOX = Path("/bin/busybox")


@pytest.fixture(scope="session")
def init_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_init(tmp_path_factory.mktemp("native"))


APPLETS = ("sh", "ash", "id", "pwd", "echo", "sleep", "env", "cat")


def busybox_tree(root: Path, applets: tuple[str, ...] = APPLETS) -> Path:
    """A tiny image tree: busybox-static, applet links, passwd/group with an `app` user."""
    for d in ("bin", "etc", "app", "tmp", "usr/share/doc/pkg", "usr/share/man/man1"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for a in applets:
        (root / "bin" / a).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/app:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app\n")
    (root / "usr/share/doc/pkg/README").write_text("docs\n")
    (root / "usr/share/man/man1/x.1").write_text("man\n")
    (root / "tmp").chmod(0o1777)
    return root


@pytest.fixture
def make_tree() -> Callable[..., Path]:
    return busybox_tree


def _tar_layer(entries: list[tuple[str, bytes | None, int, str | None]]) -> bytes:
    """A gzip'd tar layer from (path, data or None for a dir, mode, symlink target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, mode, link in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_600_000_000
            info.mode = mode
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tf.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


Entry = tuple[str, bytes | None, int, str | None]


def write_oci_layout(path: Path, config: dict[str, object], layers: list[list[Entry]]) -> str:
    """Write an OCI image layout with one image (tag ``latest``); returns ``oci:PATH:latest``."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    descs, diff_ids = [], []
    for entries in layers:
        gz = _tar_layer(entries)
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(gz)).hexdigest())
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": put(gz), "size": len(gz)})  # fmt: skip
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": config,
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(cfg),
                   "size": len(cfg)},
        "layers": descs,
    }).encode()  # fmt: skip
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest),
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }]}  # fmt: skip
    (path / "index.json").write_text(json.dumps(index))
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return f"oci:{path}:latest"


def busybox_app_image(path: Path, *, entry: str = "/app/server", extra: bytes = b"") -> str:
    """A two-layer image: busybox + shell links + docs, then an app (a shell-free ELF entry)."""
    bb = BUSYBOX.read_bytes()
    base = [("bin", None, 0o755, None), ("bin/busybox", bb, 0o755, None),
            ("bin/sh", None, 0o777, "busybox"), ("bin/cat", None, 0o777, "busybox"),
            ("etc", None, 0o755, None),
            ("etc/passwd", b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n", 0o644,
             None),
            ("etc/group", b"root:x:0:\napp:x:1000:\n", 0o644, None),
            ("usr/share/doc/busybox/README", b"docs" * 100, 0o644, None)]  # fmt: skip
    app = [("app", None, 0o755, None), ("app/server", bb, 0o4755, None),
           ("app/blob.bin", extra, 0o644, None)]  # fmt: skip
    config = {"Entrypoint": [entry], "Cmd": ["--port", "8080"], "Env": ["PATH=/bin", "A=1"],
              "WorkingDir": "/app", "User": "app", "ExposedPorts": {"8080/tcp": {}}}  # fmt: skip
    return write_oci_layout(path, config, [base, app])


@pytest.fixture
def app_image(tmp_path: Path) -> str:
    return busybox_app_image(tmp_path / "layout")


@pytest.fixture
def oci_layout() -> Callable[..., str]:
    """``write_oci_layout`` (tests/builder is not a package, so tests get it as a fixture)."""
    return write_oci_layout
