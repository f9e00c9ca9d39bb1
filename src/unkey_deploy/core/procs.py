"""Process trees from /proc (Linux), shared by metald (a sandbox's processes) and metering (a
VM's CPU and memory on a host without cgroups)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def children(pid: int) -> list[int]:
    """The children of ``pid`` (of all its threads); [] when it is gone."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                out += [int(x) for x in (task / "children").read_text().split()]
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a process gone meanwhile simply has none)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    return tree
