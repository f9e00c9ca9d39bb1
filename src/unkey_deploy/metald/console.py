"""Reading VMs' consoles (serial console of a VM, output of a sandbox) for ``unkey logs``.

The VMM writes the console to a file on the VM's host; metald records its path in the VM's
runtime. :func:`read_consoles` is the one way other services read it (gatewayd's
``GET /v1/deployments/{id}/logs``): it reads the file where the caller shares the host's
filesystem (one-host stacks); a cluster whose gateway runs elsewhere needs this function to ask
the VM's host agent instead, a change confined to this module.

A log is bounded on disk by :func:`compact` (metald's reconcile loop, ``console_keep_bytes``):
its old part is freed in place, and the reader skips it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from . import linux, models

DEFAULT_TAIL = 64 * 1024
_BLOCK = 4096  # holes are punched in whole blocks


@dataclass(frozen=True)
class Console:
    """Part of one VM's console: ``data`` starts at byte ``offset`` of the file, which is
    ``size`` bytes long; ``truncated`` when bytes after the asked offset were skipped to keep
    to ``tail``. Poll again with ``offset=size`` for what was written since."""

    vm_id: str
    state: str
    instance_id: str | None
    data: bytes
    offset: int
    size: int
    truncated: bool


def _read(path: str | None, offset: int | None, tail: int) -> tuple[bytes, int, int, bool]:
    if not path:
        return b"", 0, 0, False
    want = offset or 0
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if want > size:  # a new file (the VM restarted): from its beginning
                want = 0
            start = max(min(want, size), size - tail)
            start = max(start, _kept_from(fh.fileno(), start, size))
            fh.seek(start)
            return fh.read(size - start), start, size, start > want
    except FileNotFoundError:  # not booted yet
        return b"", 0, 0, False


def _kept_from(fd: int, start: int, size: int) -> int:
    """The first offset from ``start`` that :func:`compact` kept (past the freed part)."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nothing but a hole from there
            return size
        return start  # (a file system without SEEK_DATA: nothing was freed either)


def compact(path: Path, keep: int) -> int:
    """Free all but the last ``keep`` bytes (at least) of the console log at ``path`` once it
    holds twice that on disk; returns the bytes freed. The VMM keeps writing to it as before:
    the old part becomes a hole (:func:`linux.punch_hole`), so sizes and offsets (a reader's
    ``offset=size``) stay valid; :func:`read_consoles` skips it and says ``truncated``. A
    chatty app can thus never fill its host's disk with its console."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        st = os.fstat(fd)
        if st.st_blocks * 512 <= 2 * keep:
            return 0
        start = _kept_from(fd, 0, st.st_size)
        end = (st.st_size - keep) // _BLOCK * _BLOCK
        if end <= start:
            return 0
        linux.punch_hole(fd, start, end - start)
        return end - start
    finally:
        os.close(fd)


def read_consoles(
    db: sa.Connection | Session,
    deployment_id: str,
    *,
    vm_id: str | None = None,
    offset: int | None = None,
    tail: int = DEFAULT_TAIL,
) -> list[Console]:
    """The consoles of ``deployment_id``'s VMs (oldest VM first; only ``vm_id`` if given):
    from ``offset`` (default: the start), at most the last ``tail`` bytes of each. The caller
    checks that the reader may see the deployment; ``db`` is its connection or session."""
    if tail < 1:
        raise ValueError("tail must be at least 1 byte")
    vms = models.vms
    q = (
        sa.select(vms.c.vm_id, vms.c.state, vms.c.instance_id, vms.c.runtime)
        .where(vms.c.deployment_id == deployment_id)
        .order_by(vms.c.created_at)
    )
    if vm_id is not None:
        q = q.where(vms.c.vm_id == vm_id)
    out = []
    for r in db.execute(q).all():
        runtime = r.runtime if isinstance(r.runtime, dict) else {}
        path = runtime.get("log_path")
        data, start, size, truncated = _read(path if isinstance(path, str) else None, offset, tail)
        out.append(Console(r.vm_id, r.state, r.instance_id, data, start, size, truncated))
    return out
