"""Small network helpers shared by services, the local stack and the tests."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
import tempfile
import time
from pathlib import Path

# Ports are drawn below the kernel's ephemeral range (32768-60999 by default), so an outgoing
# connection can never take a port between the draw and the server's bind, and every draw is
# recorded in a file shared by all processes on the machine, so two processes (two stacks, two
# parallel tests) are never handed the same port while the first may still be starting.
DRAW_RANGE = (20000, 32767)
RESERVE_S = 900.0  # a drawn port is not handed out again for this long
LEDGER = Path(tempfile.gettempdir()) / "unkey-ports.json"


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now and not handed to anyone else on this machine
    for the next ``RESERVE_S`` seconds (loopback by default)."""
    try:
        fd = os.open(LEDGER, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # no shared ledger (read-only tmp): the kernel's draw is the best we have
        return _kernel_port(host)
    with os.fdopen(fd, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        now = time.time()
        try:
            taken = {int(p): float(t) for p, t in json.loads(fh.read() or "{}").items()}
        except (ValueError, AttributeError):
            taken = {}
        taken = {p: t for p, t in taken.items() if now - t < RESERVE_S}
        lo, hi = DRAW_RANGE
        port = 0
        for _ in range(200):
            candidate = random.randint(lo, hi)  # noqa: S311 (not a secret)
            if candidate not in taken and _bindable(host, candidate):
                port = candidate
                break
        if not port:
            port = _kernel_port(host)
        taken[port] = now
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({str(p): t for p, t in taken.items()}))
        fh.flush()
        with contextlib.suppress(OSError):
            os.fchmod(fh.fileno(), 0o666)
    return port
