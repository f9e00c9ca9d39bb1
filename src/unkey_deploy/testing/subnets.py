"""A private /24 for a test's VM networking that no other test process holds at the moment."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

SUBNET_LOCKS = Path("/tmp/unkey-test-subnets")


@contextlib.contextmanager
def reserved_subnet() -> Iterator[str]:
    """A /24 out of 172.31.64.0-172.31.255.0, locked (by pid) for the ``with`` block."""
    SUBNET_LOCKS.mkdir(exist_ok=True)
    choices = list(range(64, 256))
    random.shuffle(choices)
    for n in choices:
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
