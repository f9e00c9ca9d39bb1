"""A private /24 for a test's VM networking that no other test process holds at the moment."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

SUBNET_LOCKS = Path("/tmp/unkey-test-subnets")


@contextlib.contextmanager
def reserved_subnet() -> Iterator[str]:
    """A /24 out of 172.31.64.0-172.31.255.0, locked (by pid) for the ``with`` block. A /24
    the host already routes (a VM some killed test run left behind) is never handed out: a
    test's VM there would share an address with it."""
    SUBNET_LOCKS.mkdir(exist_ok=True)
    choices = list(range(64, 256))
    random.shuffle(choices)
    routed = _routed_networks()
    for n in choices:
        if any(net.overlaps(ipaddress.IPv4Network(f"172.31.{n}.0/24")) for net in routed):
            continue
        lock = SUBNET_LOCKS / str(n)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            # stale lock of a dead worker?
            with contextlib.suppress(OSError, ValueError):
                if not Path(f"/proc/{int(lock.read_text())}").exists():
                    lock.unlink()
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        try:
            yield f"172.31.{n}.0/24"
        finally:
            lock.unlink()
        return
    raise RuntimeError("no free test subnet")


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """The host's IPv4 routes other than the default one (/proc/net/route: hex, host order)."""
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            f = line.split()
            dest, mask = (socket.inet_ntoa(struct.pack("<I", int(x, 16))) for x in (f[1], f[7]))
            if int(f[7], 16):  # not the default route
                out.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return out
