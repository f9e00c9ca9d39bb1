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


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def is_zstd(path: Path) -> bool:
    """By content, not name: content-addressed asset blobs carry no suffix."""
    with open(path, "rb") as fh:
        return fh.read(4) == ZSTD_MAGIC


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
            if is_zstd(src):
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


ENV_FILE = "/.vminit/env"


def parse_env(data: bytes) -> dict[str, str]:
    """The builder's env file: NUL-separated ``KEY=VALUE`` entries."""
    out: dict[str, str] = {}
    for item in data.split(b"\0"):
        if b"=" in item:
            k, _, v = item.decode(errors="replace").partition("=")
            out[k] = v
    return out


def render_env(env: dict[str, str]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())


def merge_env_tree(root: Path, env: dict[str, str]) -> None:
    """Add/override ``env`` in ``<root>/.vminit/env`` of an unpacked tree (no-op without one)."""
    path = root / ENV_FILE.lstrip("/")
    if not env or not path.parent.is_dir():
        return
    current = parse_env(path.read_bytes()) if path.exists() else {}
    path.write_bytes(render_env({**current, **env}))


RESOLV_CONF = "/etc/resolv.conf"


def render_resolv(servers: list[str]) -> bytes:
    return "".join(f"nameserver {s}\n" for s in servers).encode()


def write_resolv_tree(root: Path, servers: list[str]) -> None:
    """Give an unpacked tree (the sandbox's per-VM overlay) ``servers`` as its resolvers; a
    symlink there (images often point it at a resolver daemon's file) is replaced."""
    if not servers:
        return
    path = root / RESOLV_CONF.lstrip("/")
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    path.write_bytes(render_resolv(servers))
    path.chmod(0o644)


def inject_resolv(image: Path, servers: list[str]) -> None:
    """:func:`write_resolv_tree` inside an ext4 image (``debugfs``, no mount)."""
    if servers:
        _debugfs_write(image, RESOLV_CONF, render_resolv(servers), mkdir="/etc")


def _debugfs_write(image: Path, path: str, data: bytes, *, mkdir: str | None = None) -> None:
    """Replace (or create) the file ``path`` of an ext4 image with ``data``."""
    tmp = image.with_name(f"{Path(path).name}.tmp")
    tmp.write_bytes(data)
    try:
        cmds = (f"mkdir {mkdir}\n" if mkdir else "") + f"rm {path}\nwrite {tmp} {path}\n"
        proc = subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=cmds,
                              capture_output=True, text=True, check=False)  # fmt: skip
        if proc.returncode != 0 or "Allocated inode" not in proc.stdout + proc.stderr:
            raise VmError(f"cannot write {path} into {image}: {proc.stderr.strip()[-300:]}")
    finally:
        tmp.unlink(missing_ok=True)


def inject_env(image: Path, env: dict[str, str]) -> None:
    """Add/override ``env`` in ``/.vminit/env`` inside an ext4 image, without mounting it
    (``debugfs``; works without root). Images without ``/.vminit`` are left alone."""
    if not env:
        return
    probe = subprocess.run(
        ["debugfs", "-R", "stat /.vminit", str(image)], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0 or "Inode:" not in probe.stdout:
        return
    cur = subprocess.run(
        ["debugfs", "-R", f"cat {ENV_FILE}", str(image)], capture_output=True, check=False
    )
    current = parse_env(cur.stdout) if cur.returncode == 0 else {}
    _debugfs_write(image, ENV_FILE, render_env({**current, **env}))
