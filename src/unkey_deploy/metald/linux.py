"""Linux system calls metald makes itself instead of running a helper program (root only).

Mounts and loop devices: a sandbox boot needs two mounts (the image read-only through a loop
device, an overlay on top); running ``mount`` twice costs two fork+execs of util-linux on the
boot path (~10 ms each on our loaded CI machines). These make util-linux's system calls:
``LOOP_CTL_GET_FREE`` + ``LOOP_CONFIGURE`` (Linux >= 5.8; read-only, autoclear: the device frees
itself on unmount) and ``mount(2)``. Callers fall back to the ``mount`` command when the kernel
lacks ``LOOP_CONFIGURE`` (:class:`Unsupported`).

Idmapped mounts: a copy of a mount whose files' owners are seen through a user namespace
(:func:`mount_idmapped`: a sandbox's image, owned by its own range of host uids).

Console logs: freeing their old part in place (:func:`punch_hole`).

Network namespaces: renaming a named one (:func:`rename_bind_mount`) and writing a sysctl inside
one (:func:`netns_sysctl`) without ``ip netns exec``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
import threading
from pathlib import Path

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
# struct loop_info64 { u64 device, inode, rdevice, offset, sizelimit; u32 number, encrypt_type,
#                      encrypt_key_size, flags; u8 file_name[64], crypt_name[64], key[32];
#                      u64 init[2]; }
_LOOP_CONFIG = struct.Struct("=II QQQQQ IIII 64s64s32s QQ 8Q")
assert _LOOP_CONFIG.size == 304  # noqa: S101 - the kernel ABI; a wrong layout must not run

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]  # fmt: skip
_libc.mount.restype = ctypes.c_int


class Unsupported(OSError):
    """The kernel cannot do this without util-linux's help (no LOOP_CONFIGURE)."""


def _checked(result: int, what: str) -> int:
    """A libc call's ``result``, or OSError naming ``what`` when it failed (-1, errno set)."""
    if result < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return result


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raises OSError naming the mount."""
    _checked(_libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()),
             f"mount -t {fstype} {source} {target} ({data})")  # fmt: skip


def mount_ext4_ro(image: str, target: str) -> None:
    """Mount the ext4 ``image`` read-only at ``target`` through a free loop device (read-only,
    autoclear: it frees itself once the mount is gone). noload: never replay the journal of an
    image we only read."""
    bfd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(50):
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{n}"
                lfd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    name = os.fsencode(image)[-63:]
                    cfg = _LOOP_CONFIG.pack(bfd, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                            LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                                            name, b"", b"", 0, 0, *([0] * 8))  # fmt: skip
                    try:
                        fcntl.ioctl(lfd, LOOP_CONFIGURE, cfg)
                    except OSError as exc:
                        if exc.errno == errno.EBUSY:  # another process took it first: next one
                            continue
                        if exc.errno in (errno.EINVAL, errno.ENOTTY):
                            raise Unsupported(exc.errno, "LOOP_CONFIGURE not supported") from exc
                        raise
                    # mount while our fd still holds the device: autoclear detaches it at the
                    # last close, which is now the mount's (or ours below, if the mount fails)
                    mount(dev, target, "ext4", MS_RDONLY, "noload")
                    return
                finally:
                    os.close(lfd)
            raise OSError(errno.EBUSY, f"no free loop device for {image}")
        finally:
            os.close(ctl)
    finally:
        os.close(bfd)


MS_BIND = 4096
MNT_DETACH = 2
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def umount(target: str, flags: int = 0) -> None:
    """umount2(2); raises OSError naming the mount point."""
    _checked(_libc.umount2(target.encode(), flags), f"umount {target}")


FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free ``length`` bytes of the file from ``offset`` (they read as zeros; the size and
    every offset stay as they are, so a process appending to it is not disturbed)."""
    _checked(_libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length),
             f"fallocate(PUNCH_HOLE) of {length} bytes")  # fmt: skip


# x86_64 (and every architecture using the generic table): open_tree 428, move_mount 429,
# mount_setattr 442
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
_AT_FDCWD, _AT_EMPTY_PATH = -100, 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 4
_MOUNT_ATTR_IDMAP = 0x00100000
# struct mount_attr { u64 attr_set, attr_clr, propagation, userns_fd; }
_MOUNT_ATTR = struct.Struct("=QQQQ")
_libc.syscall.restype = ctypes.c_long


def _sys(what: str, nr: int, *args: object) -> int:
    return _checked(int(_libc.syscall(nr, *args)), what)


def mount_idmapped(source: str, target: str, userns: str) -> None:
    """Mount a copy of the mount at ``source`` at ``target``, its files' owners seen through
    the user namespace at ``userns`` (a /proc/<pid>/ns/user): a file owned by uid N shows as
    owned by the host uid that is N in that namespace (Linux >= 5.12; overlayfs accepts such
    a mount as a lower layer from 5.19)."""
    ns = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        tree = _sys(f"open_tree {source}", _SYS_OPEN_TREE, _AT_FDCWD, source.encode(),
                    _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC)  # fmt: skip
        try:
            attr = _MOUNT_ATTR.pack(_MOUNT_ATTR_IDMAP, 0, 0, ns)
            _sys(f"mount_setattr idmap {source} via {userns}", _SYS_MOUNT_SETATTR, tree, b"",
                 _AT_EMPTY_PATH, attr, len(attr))  # fmt: skip
            _sys(f"move_mount {source} {target}", _SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD,
                 target.encode(), _MOVE_MOUNT_F_EMPTY_PATH)  # fmt: skip
        finally:
            os.close(tree)
    finally:
        os.close(ns)


def rename_bind_mount(old: str, new: str) -> None:
    """Move the file bind mount at ``old`` (e.g. a named network namespace under /run/netns) to
    the new file ``new``: bind it there, then detach and remove ``old``. (rename(2) of a mount
    point fails with EBUSY.)"""
    fd = os.open(new, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)
    try:
        mount(old, new, "none", MS_BIND)
    except OSError:
        Path(new).unlink()
        raise
    umount(old, MNT_DETACH)
    Path(old).unlink()


CLONE_NEWNET = 0x40000000
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def netns_sysctl(netns_path: str, key: str, value: str) -> None:
    """Write the per-network-namespace sysctl ``key`` (e.g. ``net/ipv4/ip_forward``) inside the
    namespace at ``netns_path``: a throw-away thread joins it (setns only moves the calling
    thread; /proc/sys/net follows the namespace of the thread that opens it) and writes."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _checked(_libc.setns(fd, CLONE_NEWNET), f"setns {netns_path}")
            finally:
                os.close(fd)
            Path(f"/proc/sys/{key}").write_text(value)
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    t = threading.Thread(target=run, name="netns-sysctl")
    t.start()
    t.join()
    if errors:
        raise errors[0]
