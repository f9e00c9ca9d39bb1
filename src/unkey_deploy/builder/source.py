"""Image sources -> one uniform :class:`ResolvedImage`.

Accepted references (``resolve(image_ref)``):

* ``[docker://][registry/]repo[:tag][@sha256:...]`` pulled over the distribution API
  (:mod:`.oci`); an image index resolves to linux/amd64.
* ``oci:PATH[:tag]``: an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``);
  the tag matches ``org.opencontainers.image.ref.name``; without a tag the layout must hold one
  image (or an index that resolves to linux/amd64).
* ``docker-archive:PATH``: a ``docker save`` tarball (``manifest.json`` + config + layers).

Every blob read from any source goes through :class:`~.oci.VerifiedStream` (size + sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import BuilderConfig
from ..core.errors import ImageError
from .oci import (
    CONFIG_TYPES,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    Descriptor,
    Reference,
    RegistryClient,
    VerifiedStream,
    check_digest,
    short_digest,
)

PLATFORM = ("linux", "amd64")

# Opens a blob by descriptor as a verified stream; ``progress(n)`` gets bytes read.
BlobOpener = Callable[[Descriptor, Callable[[int], None] | None], VerifiedStream]


@dataclass(frozen=True)
class Layer:
    """One layer: its (compressed) blob descriptor and its diff_id (uncompressed, from config)."""

    index: int
    descriptor: Descriptor
    diff_id: str | None

    @property
    def digest(self) -> str:
        return self.descriptor.digest

    @property
    def media_type(self) -> str:
        return self.descriptor.media_type

    @property
    def size(self) -> int:
        return self.descriptor.size


@dataclass
class ResolvedImage:
    """An image ready to extract, whatever its source.

    ``config`` is the whole config blob (JSON object); ``image_config`` its ``config`` section
    (Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts), which
    :meth:`unkey_deploy.builder.vminit.ImageConfig.from_oci` accepts. ``manifest_digest`` is the
    sha256 of the platform manifest (for ``docker-archive:`` sources, which have no manifest, it is
    the config digest, i.e. Docker's image id). ``layers`` are in application order.
    Close it (or use ``with``) to release the registry connection / archive file.
    """

    source: str
    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    config: dict[str, Any]
    layers: tuple[Layer, ...]
    _opener: BlobOpener = field(repr=False)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    index_digest: str | None = None

    @property
    def image_config(self) -> dict[str, Any]:
        c = self.config.get("config")
        return c if isinstance(c, dict) else {}

    @property
    def entrypoint(self) -> list[str]:
        return list(self.image_config.get("Entrypoint") or [])

    @property
    def cmd(self) -> list[str]:
        return list(self.image_config.get("Cmd") or [])

    @property
    def env(self) -> list[str]:
        return list(self.image_config.get("Env") or [])

    @property
    def working_dir(self) -> str:
        return str(self.image_config.get("WorkingDir") or "")

    @property
    def user(self) -> str:
        return str(self.image_config.get("User") or "")

    @property
    def exposed_ports(self) -> list[str]:
        return sorted(self.image_config.get("ExposedPorts") or {})

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def open_layer(
        self, layer: Layer, progress: Callable[[int], None] | None = None
    ) -> VerifiedStream:
        """The layer's blob as a verified stream (digest + size checked while reading)."""
        return self._opener(layer.descriptor, progress)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> ResolvedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve(
    image_ref: str,
    *,
    config: BuilderConfig | None = None,
    credentials: Mapping[str, tuple[str, str]] | None = None,
    client: RegistryClient | None = None,
) -> ResolvedImage:
    """Resolve ``image_ref`` (registry ref, ``oci:PATH[:tag]`` or ``docker-archive:PATH``).

    Reads and checks the manifest (or index -> linux/amd64) and the config; layers are opened
    later with :meth:`ResolvedImage.open_layer`. Raises :class:`ImageError` naming what is wrong.
    ``credentials`` maps registry host[:port] -> (user, password). A passed ``client`` is not
    closed by the image; otherwise the image owns (and closes) its client.
    """
    cfg = config or BuilderConfig()
    if image_ref.startswith("oci:"):
        return _resolve_layout(image_ref, cfg)
    if image_ref.startswith("docker-archive:"):
        return _resolve_archive(image_ref, cfg)
    ref = Reference.parse(image_ref)
    own = client is None
    cl = client or RegistryClient(cfg, credentials=credentials)
    try:
        img = _resolve_registry(image_ref, ref, cl, cfg)
    except BaseException:
        if own:
            cl.close()
        raise
    if own:
        img._closers.append(cl.close)
    return img


# -- manifest logic shared by registry and layouts ----------------------------------------------


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ImageError(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def media_type_of(raw_json: dict[str, Any], header_type: str, what: str) -> str:
    body_type = raw_json.get("mediaType")
    mt = body_type if isinstance(body_type, str) and body_type else header_type
    if not mt:
        # OCI allows omitting mediaType; infer from the shape.
        mt = (
            "application/vnd.oci.image.index.v1+json"
            if "manifests" in raw_json
            else "application/vnd.oci.image.manifest.v1+json"
        )
    if raw_json.get("schemaVersion") == 1 or mt.startswith(
        "application/vnd.docker.distribution.manifest.v1"
    ):
        raise ImageError(f"{what}: Docker schema 1 manifests are not supported (media type {mt})")
    if mt not in MANIFEST_TYPES and mt not in INDEX_TYPES:
        raise ImageError(f"{what}: unsupported manifest media type {mt!r}")
    return mt


def pick_platform(index: dict[str, Any], what: str) -> Descriptor:
    """The linux/amd64 entry of an image index."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{what}: image index has no manifests list")
    seen = []
    for i, raw in enumerate(entries):
        d = Descriptor.parse(raw, f"{what} manifests[{i}]")
        p = d.platform or {}
        seen.append(f"{p.get('os', '?')}/{p.get('architecture', '?')}")
        if (p.get("os"), p.get("architecture")) == PLATFORM:
            if d.media_type not in MANIFEST_TYPES:
                raise ImageError(
                    f"{what}: linux/amd64 entry has unsupported media type {d.media_type!r}"
                )
            return d
    raise ImageError(
        f"{what}: image index has no linux/amd64 image (platforms: {', '.join(seen) or 'none'})",
        suggestion="build or push the image for linux/amd64",
    )


def parse_manifest(m: dict[str, Any], what: str) -> tuple[Descriptor, list[Descriptor]]:
    """(config descriptor, layer descriptors) of an image manifest, with media types checked."""
    if "config" not in m:
        raise ImageError(f"{what}: manifest has no config")
    cdesc = Descriptor.parse(m["config"], f"{what} config")
    if cdesc.media_type not in CONFIG_TYPES:
        raise ImageError(f"{what}: unsupported config media type {cdesc.media_type!r}")
    raw_layers = m.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"{what}: manifest has no layers list")
    layers = []
    for i, raw in enumerate(raw_layers):
        d = Descriptor.parse(raw, f"{what} layers[{i}]")
        if d.media_type not in LAYER_TYPES:
            raise ImageError(
                f"{what}: layer {i} ({short_digest(d.digest)}) has unsupported media type "
                f"{d.media_type!r}",
                details={"digest": d.digest},
            )
        layers.append(d)
    return cdesc, layers


def build_layers(config: dict[str, Any], descs: list[Descriptor], what: str) -> tuple[Layer, ...]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageError(f"{what}: image config has no rootfs.diff_ids")
    if len(diff_ids) != len(descs):
        raise ImageError(
            f"{what}: image config lists {len(diff_ids)} diff_ids "
            f"but the manifest has {len(descs)} layers"
        )
    return tuple(
        Layer(i, d, check_digest(diff_ids[i], f"{what} diff_ids[{i}]")) for i, d in enumerate(descs)
    )


def check_config(config: dict[str, Any], what: str) -> None:
    os_, arch = config.get("os"), config.get("architecture")
    if os_ is not None and arch is not None and (os_, arch) != PLATFORM:
        raise ImageError(f"{what}: image is for {os_}/{arch}, not linux/amd64")
    inner = config.get("config")
    if inner is not None and not isinstance(inner, dict):
        raise ImageError(f"{what}: image config 'config' must be an object")


def _resolve_generic(
    source: str,
    fetch_manifest: Callable[[Descriptor | None], tuple[bytes, str, str]],
    opener: BlobOpener,
    cfg: BuilderConfig,
) -> ResolvedImage:
    raw, ctype, digest = fetch_manifest(None)
    what = source
    m = _json(raw, f"{what}: manifest")
    mt = media_type_of(m, ctype, what)
    index_digest = None
    if mt in INDEX_TYPES:
        index_digest = digest
        desc = pick_platform(m, what)
        raw, ctype, digest = fetch_manifest(desc)
        m = _json(raw, f"{what}: manifest {short_digest(desc.digest)}")
        mt = media_type_of(m, ctype or desc.media_type, what)
        if mt not in MANIFEST_TYPES:
            raise ImageError(f"{what}: index entry for linux/amd64 is not an image manifest ({mt})")
    cdesc, ldescs = parse_manifest(m, what)
    with opener(cdesc, None) as s:
        if cdesc.size > cfg.max_manifest_bytes:
            raise ImageError(
                f"{what}: config blob is {cdesc.size} bytes, "
                f"over the {cfg.max_manifest_bytes}-byte limit"
            )
        craw = s.read()
    config = _json(craw, f"{what}: image config {short_digest(cdesc.digest)}")
    check_config(config, what)
    layers = build_layers(config, ldescs, what)
    total = sum(d.size for d in ldescs)
    if total > cfg.max_image_bytes:
        raise ImageError(
            f"{what}: layers total {total} bytes, over the {cfg.max_image_bytes}-byte image limit"
        )
    return ResolvedImage(
        source=source,
        manifest_digest=digest,
        manifest_media_type=mt,
        config_digest=cdesc.digest,
        config=config,
        layers=layers,
        _opener=opener,
        index_digest=index_digest,
    )


def _resolve_registry(
    source: str, ref: Reference, client: RegistryClient, cfg: BuilderConfig
) -> ResolvedImage:
    def fetch(desc: Descriptor | None) -> tuple[bytes, str, str]:
        if desc is None:
            return client.get_manifest(ref)
        return client.get_manifest(ref, desc.digest, expect=desc)

    def opener(desc: Descriptor, progress: Callable[[int], None] | None) -> VerifiedStream:
        return client.open_blob(
            ref, desc, max_bytes=min(cfg.max_layer_bytes, cfg.max_image_bytes), progress=progress
        )

    return _resolve_generic(source, fetch, opener, cfg)


# -- oci: layouts -------------------------------------------------------------------------------


def _file_stream(
    path: Path, desc: Descriptor, progress: Callable[[int], None] | None, what: str
) -> VerifiedStream:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as e:
        raise ImageError(
            f"{what}: blob {short_digest(desc.digest)} is missing from the layout"
        ) from e
    except OSError as e:
        raise ImageError(f"{what}: cannot open blob {short_digest(desc.digest)}: {e}") from e
    f = os.fdopen(fd, "rb")

    def chunks() -> Any:
        while True:
            b = f.read(1 << 20)
            if not b:
                return
            yield b

    return VerifiedStream(
        chunks(),
        digest=desc.digest,
        size=desc.size,
        what=f"blob {short_digest(desc.digest)}",
        progress=progress,
        on_close=f.close,
    )


def _resolve_layout(image_ref: str, cfg: BuilderConfig) -> ResolvedImage:
    spec = image_ref[len("oci:") :]
    path, tag = Path(spec), None
    if not path.is_dir() and ":" in spec:
        p, _, t = spec.rpartition(":")
        path, tag = Path(p), t
    if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
        raise ImageError(
            f"{image_ref}: {path} is not an OCI image layout (no oci-layout / index.json)"
        )
    blobs = path / "blobs" / "sha256"

    def blob_path(d: Descriptor) -> Path:
        return blobs / d.digest.split(":", 1)[1]

    def read_small(d: Descriptor, what: str) -> bytes:
        if d.size > cfg.max_manifest_bytes:
            raise ImageError(
                f"{what}: manifest {short_digest(d.digest)} is {d.size} bytes, "
                f"over the {cfg.max_manifest_bytes}-byte limit"
            )
        with _file_stream(blob_path(d), d, None, what) as s:
            return s.read()

    with (path / "index.json").open("rb") as f:
        top_raw = f.read(cfg.max_manifest_bytes + 1)
    if len(top_raw) > cfg.max_manifest_bytes:
        raise ImageError(f"{image_ref}: index.json exceeds the {cfg.max_manifest_bytes}-byte limit")
    top = _json(top_raw, f"{image_ref}: index.json")
    entries = top.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{image_ref}: index.json lists no images")
    descs = [
        Descriptor.parse(e, f"{image_ref}: index.json manifests[{i}]")
        for i, e in enumerate(entries)
    ]
    names = []
    for i, e in enumerate(entries):  # every entry is an object: Descriptor.parse checked that
        ann = e.get("annotations") or {}
        if not isinstance(ann, dict):
            raise ImageError(
                f"{image_ref}: index.json manifests[{i}]: annotations must be an object"
            )
        names.append(ann.get("org.opencontainers.image.ref.name"))
    if tag is not None:
        chosen = [d for d, name in zip(descs, names, strict=True) if name == tag]
        if not chosen:
            raise ImageError(f"{image_ref}: no image tagged {tag!r} in the layout")
        first = chosen[0]
    elif len(descs) == 1:
        first = descs[0]
    else:
        first = pick_platform(top, image_ref)

    def fetch(desc: Descriptor | None) -> tuple[bytes, str, str]:
        d = desc or first
        return read_small(d, image_ref), d.media_type, d.digest

    def opener(desc: Descriptor, progress: Callable[[int], None] | None) -> VerifiedStream:
        return _file_stream(blob_path(desc), desc, progress, image_ref)

    return _resolve_generic(image_ref, fetch, opener, cfg)


# -- docker-archive: tarballs -------------------------------------------------------------------


def _resolve_archive(image_ref: str, cfg: BuilderConfig) -> ResolvedImage:
    path = Path(image_ref[len("docker-archive:") :])
    try:
        tf = tarfile.open(path, mode="r:")  # noqa: SIM115 (closed by the image)
    except (OSError, tarfile.TarError) as e:
        raise ImageError(f"{image_ref}: cannot read docker archive: {e}") from e
    try:
        members = {m.name.removeprefix("./"): m for m in tf.getmembers() if m.isfile()}

        def member_bytes(name: str, cap: int) -> bytes:
            m = members.get(name)
            if m is None:
                raise ImageError(f"{image_ref}: {name!r} is missing from the archive")
            if m.size > cap:
                raise ImageError(
                    f"{image_ref}: {name!r} is {m.size} bytes, over the {cap}-byte limit"
                )
            f = tf.extractfile(m)
            if f is None:
                raise ImageError(f"{image_ref}: {name!r} is not a regular file")
            return f.read()

        man = json.loads(member_bytes("manifest.json", cfg.max_manifest_bytes))
        if not isinstance(man, list) or len(man) != 1 or not isinstance(man[0], dict):
            raise ImageError(f"{image_ref}: manifest.json must list exactly one image")
        entry = man[0]
        cname, lnames = entry.get("Config"), entry.get("Layers")
        if (
            not isinstance(cname, str)
            or not isinstance(lnames, list)
            or not all(isinstance(x, str) for x in lnames)
        ):
            raise ImageError(f"{image_ref}: manifest.json entry needs Config and Layers")
        craw = member_bytes(cname, cfg.max_manifest_bytes)
        config = _json(craw, f"{image_ref}: image config")
        check_config(config, image_ref)
        cdigest = "sha256:" + hashlib.sha256(craw).hexdigest()
        # A docker archive has no descriptors: hash each layer member once up front, so every
        # later read is verified like a registry blob.
        descs = []
        for name in lnames:
            m = members.get(name.removeprefix("./"))
            if m is None:
                raise ImageError(f"{image_ref}: layer {name!r} is missing from the archive")
            if m.size > cfg.max_layer_bytes:
                raise ImageError(
                    f"{image_ref}: layer {name!r} is {m.size} bytes, "
                    f"over the {cfg.max_layer_bytes}-byte limit"
                )
            f = tf.extractfile(m)
            if f is None:
                raise ImageError(f"{image_ref}: layer {name!r} is not a regular file")
            h = hashlib.sha256()
            while b := f.read(1 << 20):
                h.update(b)
            descs.append(
                Descriptor(
                    "application/vnd.oci.image.layer.v1.tar",
                    "sha256:" + h.hexdigest(),
                    m.size,
                    urls=(m.name,),
                )
            )
        layers = build_layers(config, descs, image_ref)
    except ImageError:
        tf.close()
        raise
    except (ValueError, OSError, tarfile.TarError) as e:
        tf.close()
        raise ImageError(f"{image_ref}: broken docker archive: {e}") from e

    def opener(desc: Descriptor, progress: Callable[[int], None] | None) -> VerifiedStream:
        f = tf.extractfile(tf.getmember(desc.urls[0]))
        if f is None:
            raise ImageError(f"{image_ref}: layer {desc.urls[0]!r} is not a regular file")

        def chunks() -> Any:
            while b := f.read(1 << 20):
                yield b

        return VerifiedStream(
            chunks(),
            digest=desc.digest,
            size=desc.size,
            what=f"layer {desc.urls[0]}",
            progress=progress,
        )

    img = ResolvedImage(
        source=image_ref,
        manifest_digest=cdigest,
        manifest_media_type="application/vnd.docker.distribution.manifest.v2+json",
        config_digest=cdigest,
        config=config,
        layers=layers,
        _opener=opener,
    )
    img._closers.append(tf.close)
    return img


__all__ = ["OCI_CONFIG", "Layer", "ResolvedImage", "resolve"]
