"""Per-VM jail directories: the VMM's chroot, holding the kernel and the VM's own rootfs copy.

Layout: ``<state_dir>/jails/<vm_id>/`` with ``rootfs.ext4`` (copy-on-write: a reflink where the
file system supports it, else a sparse copy; zstd-compressed assets ``*.zst`` are decompressed
straight into a sparse file), the kernel pieces (hard links when on the same file system),
and the VMM's sockets, console log and metrics. The directory is removed on stop/delete: VM disks
are ephemeral, every boot starts from the deployment's image.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from ..core.errors import InvalidInput, VmError
from .kernel import KernelPaths

_CHUNK = 1 << 20
_ZERO = bytes(_CHUNK)


def decompress_zstd_sparse(src: Path, dst: Path) -> None:
    """Decompress a zstd file into ``dst``, leaving holes where the data is zeros."""
    import zstandard  # noqa: PLC0415 (only needed for compressed assets)

    tmp = dst.with_suffix(".part")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        reader = zstandard.ZstdDecompressor().stream_reader(fin)
        size = 0
        while True:
            chunk = reader.read(_CHUNK)
            if not chunk:
                break
            if chunk == _ZERO[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
            size += len(chunk)
        fout.truncate(size)
    tmp.replace(dst)


def copy_cow(src: Path, dst: Path) -> None:
    """Reflink ``src`` to ``dst`` when possible, else a sparse copy."""
    proc = subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise VmError(f"cannot copy {src} to {dst}: {proc.stderr.strip()}")


def link_or_copy(src: Path, dst: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        copy_cow(src, dst)


class Jails:
    """Creates and removes per-VM jail directories under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, vm_id: str) -> Path:
        return self.root / vm_id

    def prepare(
        self,
        vm_id: str,
        rootfs: Path,
        *,
        kernel: KernelPaths | None,
        copy_rootfs: bool = True,
        with_vmlinux: bool = False,
    ) -> tuple[Path, Path, KernelPaths | None]:
        """Create the jail; returns (jail dir, rootfs inside it or the shared image, kernel)."""
        src = Path(rootfs)
        if not src.is_file():
            raise InvalidInput(f"rootfs {src} does not exist or is not a file")
        jail = self.path(vm_id)
        if jail.exists():
            shutil.rmtree(jail)
        jail.mkdir(parents=True, mode=0o755)
        try:
            if src.suffix == ".zst":
                disk = jail / "rootfs.ext4"
                decompress_zstd_sparse(src, disk)
            elif copy_rootfs:
                disk = jail / "rootfs.ext4"
                copy_cow(src, disk)
            else:
                disk = src  # read-only users (the sandbox overlays it) need no copy
            jk = None
            if kernel is not None:
                link_or_copy(kernel.bzimage, jail / "vmlinuz")
                link_or_copy(kernel.initramfs, jail / "initramfs.img")
                vmlinux = jail / "vmlinux"
                if with_vmlinux:
                    link_or_copy(kernel.vmlinux, vmlinux)
                jk = KernelPaths(jail / "vmlinuz", vmlinux, jail / "initramfs.img", kernel.version)
        except BaseException:
            shutil.rmtree(jail, ignore_errors=True)
            raise
        return jail, disk, jk

    def remove(self, vm_id: str) -> None:
        jail = self.path(vm_id)
        if jail.exists():
            shutil.rmtree(jail)
