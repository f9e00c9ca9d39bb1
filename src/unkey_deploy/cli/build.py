"""``unkey build IMAGE``: the platform's image -> rootfs build, locally, without the stack.

For CI pipelines and debugging: the same pipeline as builderd (resolve, safe layer extraction,
hardening, init injection, reproducible ext4, zstd). Writes ``DIR/rootfs.ext4``,
``DIR/rootfs.ext4.zst`` (the asset as stored) and ``DIR/asset.json`` (its metadata); exits 0 and
prints the asset path and metadata (``--json``: one JSON object). A hostile or broken image exits
non-zero (10 for build errors) with an error naming the layer and the entry, and nothing but the
scratch directory (removed) is written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

from ..core.errors import UnkeyError


def _native_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unkey-deploy" / "native"


def register(group: click.Group) -> None:
    """Add this module's commands to the top-level group."""

    @group.command("build")
    @click.argument("image")
    @click.option("--output", "-o", "output", type=click.Path(path_type=Path, file_okay=False),
                  default=Path("unkey-build"), show_default=True,
                  help="directory for rootfs.ext4, rootfs.ext4.zst and asset.json")  # fmt: skip
    @click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
    @click.option("--keep-shell", is_flag=True, help="keep /bin/sh & co even if nothing needs them")
    def build(image: str, output: Path, as_json: bool, keep_shell: bool) -> None:
        """Build IMAGE (registry ref, oci:PATH[:tag], docker-archive:PATH) into a rootfs asset."""
        from ..builder.api import BuildOptions  # noqa: PLC0415 (keeps `unkey --help` light)
        from ..builder.service import OciImageSource, build_rootfs  # noqa: PLC0415
        from ..builder.vminit import build_init  # noqa: PLC0415
        from ..core.config import load  # noqa: PLC0415
        from ..core.ids import new_build_id  # noqa: PLC0415
        from .output import err, print_json  # noqa: PLC0415

        settings = load(environ=os.environ)
        output.mkdir(parents=True, exist_ok=True)
        build_id = new_build_id()
        quiet = as_json

        def log(line: str) -> None:
            if not quiet:
                err.print(line, highlight=False, markup=False)

        work = Path(tempfile.mkdtemp(prefix=".build-", dir=output))
        try:
            init = build_init(_native_dir())
            # local: images from this machine's files (oci:, docker-archive:) too
            source = OciImageSource(settings.builder, local_sources=True)
            result = build_rootfs(
                source, image, BuildOptions(keep_shell=keep_shell),
                work, init_binary=init, config=settings.builder, log=log,
            )  # fmt: skip
            rootfs = output / "rootfs.ext4"
            asset = output / "rootfs.ext4.zst"
            result.rootfs.replace(rootfs)
            result.compressed.replace(asset)
        except UnkeyError as exc:
            if as_json:
                print_json({"error": exc.to_dict()})
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        meta = result.metadata()
        meta.update({"build_id": build_id, "asset": str(asset.resolve()),
                     "rootfs": str(rootfs.resolve()),
                     "compressed": str(asset.resolve())})  # fmt: skip
        (output / "asset.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if as_json:
            print_json(meta)
        else:
            sys.stdout.write(f"{asset.resolve()}\n")
            err.print(
                f"built {image} ({result.source.manifest_digest}): "
                f"ext4 {result.ext4_bytes / 1e6:.1f} MB, "
                f"zstd {result.compressed_bytes / 1e6:.1f} MB in {result.seconds:.1f} s; "
                f"metadata in {output / 'asset.json'}",
                highlight=False, markup=False,
            )  # fmt: skip
