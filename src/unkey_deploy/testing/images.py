"""Pure-Python OCI image writer for tests and benches: layouts, registry push, test images.

Images are built byte-for-byte deterministically (fixed tar mtimes, ``gzip mtime=0``), so their
digests are stable. :class:`Built` is the unit: the top manifest (or index) bytes, its media type
and every blob it references (configs, layers and, for an index, child manifests). Nothing here
validates anything: hostile images are built by handing in whatever entries/descriptors a test
wants.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_MT = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "": "application/vnd.oci.image.layer.v1.tar",
    "docker": "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
MTIME = 1_600_000_000
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "sleep", "httpd", "env", "id", "wget")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class E:
    """One tar entry. ``kind``: file, dir, symlink, hardlink, char, block, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    link: str = ""
    mtime: int = MTIME
    size: int | None = None  # header size override (for lying headers)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_bytes(entries: Iterable[E]) -> bytes:
    """A POSIX (pax) tar of ``entries`` in the given order; names are taken literally."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            ti.uid, ti.gid, ti.mtime = e.uid, e.gid, e.mtime
            ti.uname = ti.gname = ""
            ti.linkname = e.link
            if e.kind in ("char", "block"):
                ti.devmajor, ti.devminor = 1, 3
            if e.kind == "file":
                ti.size = len(e.data)
                t.addfile(ti, io.BytesIO(e.data))
            else:
                t.addfile(ti)
    return buf.getvalue()


def compress(tar: bytes, how: str) -> bytes:
    if how in ("gzip", "docker"):
        return gzip.compress(tar, compresslevel=6, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar)
    return tar


@dataclass
class Layer:
    data: bytes  # the blob as stored (possibly compressed)
    media_type: str
    diff_id: str

    @classmethod
    def of(cls, entries: Iterable[E], how: str = "gzip") -> Layer:
        tar = tar_bytes(entries)
        return cls(compress(tar, how), LAYER_MT[how], sha(tar))


def desc(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha(data), "size": len(data), **extra}


@dataclass
class Built:
    """A pushable/writable image: top document + every blob it references (digest -> bytes)."""

    manifest: bytes
    media_type: str
    blobs: dict[str, bytes] = field(default_factory=dict)
    # Child manifests of an index (digest -> (bytes, media type)), pushed before the index.
    children: dict[str, tuple[bytes, str]] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha(self.manifest)

    def doc(self) -> dict[str, Any]:
        d: dict[str, Any] = json.loads(self.manifest)
        return d


def config_json(
    layers: list[Layer],
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    workdir: str = "",
    user: str = "",
    ports: Iterable[str] = (),
    arch: str = "amd64",
) -> dict[str, Any]:
    c: dict[str, Any] = {}
    if entrypoint is not None:
        c["Entrypoint"] = entrypoint
    if cmd is not None:
        c["Cmd"] = cmd
    if env is not None:
        c["Env"] = env
    if workdir:
        c["WorkingDir"] = workdir
    if user:
        c["User"] = user
    if ports:
        c["ExposedPorts"] = {p: {} for p in ports}
    return {
        "architecture": arch,
        "os": "linux",
        "created": "2020-09-13T12:26:40Z",
        "config": c,
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
    }


def image(
    layers: list[Layer],
    config: Mapping[str, Any] | None = None,
    *,
    docker: bool = False,
    manifest_extra: Mapping[str, Any] | None = None,
    config_bytes: bytes | None = None,
    **config_kw: Any,
) -> Built:
    """An image manifest (OCI, or Docker v2 schema 2 with ``docker=True``) over ``layers``."""
    cfg = (
        config_bytes
        if config_bytes is not None
        else json.dumps(
            dict(config) if config is not None else config_json(layers, **config_kw), sort_keys=True
        ).encode()
    )
    cmt = DOCKER_CONFIG if docker else OCI_CONFIG
    mt = DOCKER_MANIFEST if docker else OCI_MANIFEST
    man: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt,
        "config": desc(cmt, cfg),
        "layers": [
            {"mediaType": la.media_type, "digest": sha(la.data), "size": len(la.data)}
            for la in layers
        ],
    }
    man.update(manifest_extra or {})
    blobs = {sha(cfg): cfg}
    for la in layers:
        blobs[sha(la.data)] = la.data
    return Built(json.dumps(man, sort_keys=True).encode(), mt, blobs)


def index(images: Mapping[str, Built]) -> Built:
    """An OCI image index; keys are ``os/arch[/variant]``."""
    entries = []
    blobs: dict[str, bytes] = {}
    children: dict[str, tuple[bytes, str]] = {}
    for plat, b in images.items():
        parts = plat.split("/")
        p: dict[str, str] = {"os": parts[0], "architecture": parts[1]}
        if len(parts) > 2:
            p["variant"] = parts[2]
        entries.append(desc(b.media_type, b.manifest, platform=p))
        blobs.update(b.blobs)
        children[b.digest] = (b.manifest, b.media_type)
    man = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return Built(json.dumps(man, sort_keys=True).encode(), OCI_INDEX, blobs, children)


# -- outputs -----------------------------------------------------------------------------------


def write_layout(path: Path, images: Mapping[str, Built]) -> Path:
    """An OCI image layout with one ``index.json`` entry per tag."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entries = []
    for tag, b in images.items():
        for dg, data in {
            **b.blobs,
            **{k: v[0] for k, v in b.children.items()},
            b.digest: b.manifest,
        }.items():
            (blobs / dg.split(":", 1)[1]).write_bytes(data)
        entries.append(
            desc(b.media_type, b.manifest, annotations={"org.opencontainers.image.ref.name": tag})
        )
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
    return path


def write_docker_archive(path: Path, b: Built, tag: str = "test:latest") -> Path:
    """A ``docker save``-style tarball (legacy layout: ``<id>/layer.tar``, uncompressed)."""
    man = b.doc()
    cfg_digest = man["config"]["digest"]
    cfg = b.blobs[cfg_digest]
    names = []
    with tarfile.open(path, "w") as t:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), MTIME
            t.addfile(ti, io.BytesIO(data))

        add(cfg_digest.split(":")[1] + ".json", cfg)
        for ld in man["layers"]:
            data = b.blobs[ld["digest"]]
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            name = f"{ld['digest'].split(':')[1]}/layer.tar"
            add(name, data)
            names.append(name)
        entry = [{"Config": cfg_digest.split(":")[1] + ".json", "RepoTags": [tag], "Layers": names}]
        add("manifest.json", json.dumps(entry).encode())
    return path


class _TokenAuth(httpx.Auth):
    """Distribution token flow for pushes (scope pull,push) or Basic."""

    def __init__(self, creds: tuple[str, str] | None) -> None:
        self.creds = creds
        self.header: str | None = None

    def auth_flow(self, request: httpx.Request) -> Any:
        if self.header:
            request.headers["Authorization"] = self.header
        response = yield request
        if response.status_code != 401:
            return
        www = response.headers.get("www-authenticate", "")
        scheme, _, rest = www.partition(" ")
        params = {
            k.strip(): v.strip().strip('"')
            for k, _, v in (p.partition("=") for p in rest.split('",'))
        }
        basic = (
            "Basic " + base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
            if self.creds
            else None
        )
        if scheme.lower() == "basic":
            self.header = basic
        else:
            scope = params.get("scope", "")
            if scope.endswith(":pull"):
                scope += ",push"
            q = {"service": params.get("service", ""), "scope": scope}
            r = httpx.get(
                params["realm"], params=q, headers={"Authorization": basic} if basic else {}
            )
            r.raise_for_status()
            self.header = "Bearer " + (r.json().get("token") or r.json()["access_token"])
        if self.header:
            request.headers["Authorization"] = self.header
        yield request


def push(registry: str, repo: str, tag: str, b: Built, creds: tuple[str, str] | None = None) -> str:
    """Push ``b`` to ``http://registry/v2/repo`` (blobs, child manifests, then the tag)."""
    base = f"http://{registry}/v2/{repo}"
    auth = _TokenAuth(creds)
    with httpx.Client(auth=auth, timeout=30) as c:
        for dg, data in b.blobs.items():
            if c.head(f"{base}/blobs/{dg}").status_code == 200:
                continue
            r = c.post(f"{base}/blobs/uploads/")
            r.raise_for_status()
            loc = httpx.URL(f"http://{registry}").join(r.headers["location"])
            r = c.put(
                loc.copy_merge_params({"digest": dg}),
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            r.raise_for_status()
        for dg, (data, mt) in b.children.items():
            c.put(
                f"{base}/manifests/{dg}", content=data, headers={"Content-Type": mt}
            ).raise_for_status()
        r = c.put(
            f"{base}/manifests/{tag}", content=b.manifest, headers={"Content-Type": b.media_type}
        )
        r.raise_for_status()
    return b.digest


# -- the standard test images ------------------------------------------------------------------


def busybox_entries(applets: Iterable[str] = APPLETS) -> list[E]:
    out = [E("bin/", "dir"), E("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755)]
    out += [E(f"bin/{a}", "symlink", link="busybox") for a in applets]
    out += [
        E("etc/", "dir"),
        E("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n"),
        E("etc/group", data=b"root:x:0:\napp:x:1000:\n"),
        E("tmp/", "dir", mode=0o1777),
    ]
    return out


INDEX_HTML = b"<html><body><h1>hello from unkey-deploy</h1></body></html>\n"


def http_app_image(how: str = "gzip") -> Built:
    """busybox httpd serving /app/www on :8080 (the end-to-end deploy image)."""
    base = Layer.of(busybox_entries(), how)
    app = Layer.of(
        [E("app/", "dir"), E("app/www/", "dir"), E("app/www/index.html", data=INDEX_HTML)], how
    )
    return image(
        [base, app],
        entrypoint=["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/app/www"],
        env=["PATH=/bin", "GREETING=hello"],
        workdir="/app",
        ports=["8080/tcp"],
    )


def multilayer_image(how: str = "gzip", docker: bool = False) -> Built:
    """Three layers exercising whiteouts, opaque dirs, hardlinks, links and replacements.

    Expected tree afterwards: see ``MULTILAYER_EXPECT``.
    """
    l1 = Layer.of(
        [
            E("etc/", "dir"),
            E("etc/os-release", data=b"ID=test\n"),
            E("data/", "dir"),
            E("data/keep", data=b"keep\n"),
            E("data/remove-me", data=b"bye\n"),
            E("opq/", "dir"),
            E("opq/old1", data=b"old\n"),
            E("opq/sub/", "dir"),
            E("opq/sub/old2", data=b"old\n"),
            E("was-file", data=b"file\n"),
            E("usr/", "dir"),
            E("usr/bin/", "dir"),
            E("usr/bin/tool", data=b"#!tool\n", mode=0o4755),
            E("abs-link", "symlink", link="/etc/os-release"),
            E("dev/", "dir"),
            E("dev/null", "char"),
        ],
        how,
    )
    l2 = Layer.of(
        [
            E("data/.wh.remove-me"),
            E("opq/", "dir"),
            E("opq/.wh..wh..opq"),
            E("opq/new", data=b"new\n"),
            E("was-file/", "dir"),
            E("was-file/inside", data=b"inside\n"),
            E("app/", "dir", uid=1000, gid=1000),
            E("app/main.sh", data=b"#!/bin/sh\necho hi\n", mode=0o755, uid=1000, gid=1000),
            E("app/main-link", "hardlink", link="app/main.sh"),
            E("fifo", "fifo"),
        ],
        how,
    )
    l3 = Layer.of([E("etc/.wh.os-release"), E("etc/os-release", data=b"ID=test2\n")], how)
    return image(
        [l1, l2, l3],
        docker=docker,
        entrypoint=["/app/main.sh"],
        cmd=["--flag"],
        env=["PATH=/usr/bin:/bin", "A=1"],
        workdir="/app",
        user="1000:1000",
        ports=["8080/tcp"],
    )


MULTILAYER_EXPECT = {
    "etc/os-release": b"ID=test2\n",
    "data/keep": b"keep\n",
    "opq/new": b"new\n",
    "was-file/inside": b"inside\n",
    "usr/bin/tool": b"#!tool\n",
    "app/main.sh": b"#!/bin/sh\necho hi\n",
    "app/main-link": b"#!/bin/sh\necho hi\n",
}
MULTILAYER_ABSENT = ("data/remove-me", "opq/old1", "opq/sub", "dev/null", "fifo")


def arch_image(arch: str) -> Built:
    la = Layer.of([E("etc/", "dir"), E("etc/arch", data=arch.encode() + b"\n")])
    return image([la], arch=arch, entrypoint=["/bin/true"])


def multiarch_index() -> Built:
    """linux/arm64/v8 first (so picking the first entry would be wrong), then linux/amd64."""
    return index({"linux/arm64/v8": arch_image("arm64"), "linux/amd64": arch_image("amd64")})


def clean_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- hostile / broken images (for CLI and service tests; test_hostile.py has the full set) -----


def _base() -> Layer:
    return Layer.of([E("etc/", "dir"), E("etc/passwd", data=b"root:x:0:0::/:/bin/sh\n")])


def _on_base(entries: list[E]) -> Built:
    return image([_base(), Layer.of(entries)], entrypoint=["/bin/true"])


def _raw(data: bytes, media_type: str, diff_id: str | None = None) -> Built:
    return image([Layer(data, media_type, diff_id or sha(data))], entrypoint=["/bin/true"])


def hostile_images() -> dict[str, tuple[Built, str]]:
    """Name -> (image, a fragment the build error must contain). Every one must fail to build.

    All are storable in a layout and pushable to a real registry (their blobs match their
    digests); the attacks are in the layer contents, media types or config.
    """
    wrong_diff = Layer.of([E("a", data=b"a")])
    wrong_diff.diff_id = "sha256:" + "0" * 64
    plain = tar_bytes([E("a", data=b"a")])
    return {
        "dotdot": (_on_base([E("../../escape.txt", data=b"x")]), 'entry "../../escape.txt"'),
        "hardlink-outside": (_on_base([E("h", "hardlink", link="../../etc/shadow")]), "escapes"),
        "hardlink-host-abs": (_on_base([E("h", "hardlink", link="/etc/shadow")]), "does not exist"),
        "hardlink-symlink": (
            _on_base([E("s", "symlink", link="/etc/passwd"), E("h", "hardlink", link="s")]),
            "is a symlink",
        ),
        "symlink-loop": (
            _on_base(
                [E("a", "symlink", link="b"), E("b", "symlink", link="a"), E("a/x", data=b"")]
            ),
            "too many levels of symbolic links",
        ),
        "whiteout-dotdot": (_on_base([E("etc/.wh...")]), "invalid whiteout target"),
        "opaque-escape": (_on_base([E("../.wh..wh..opq")]), "escapes the root"),
        "parent-is-file": (_on_base([E("etc/passwd/x", data=b"x")]), "is not a directory"),
        "wrong-diff-id": (image([wrong_diff], entrypoint=["/x"]), "diff_id mismatch"),
        "unknown-layer-type": (
            _raw(plain, "application/vnd.example.squashfs"),
            "unsupported media type",
        ),
        "corrupt-gzip": (
            _raw(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8, LAYER_MT["gzip"]),
            "corrupt",
        ),
        "zstd-garbage": (
            _raw(b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 8, LAYER_MT["zstd"]),
            "corrupt zstd",
        ),
        "not-tar": (
            _raw(b"definitely not a tarball " * 80, LAYER_MT[""]),
            "not a valid tar stream",
        ),
        "gzip-type-plain-data": (_raw(plain, LAYER_MT["gzip"]), "layer data is not gzip"),
        "config-arm64": (arch_image("arm64"), "not linux/amd64"),
        "index-without-amd64": (index({"linux/arm64/v8": arch_image("arm64")}), "no linux/amd64"),
    }
