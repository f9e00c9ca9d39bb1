"""Hardening and slimming of an extracted image tree, in place (before the init is injected).

* shells are removed unless the app needs one: its ``argv[0]`` is a shell (``sh -c ...``, the
  shell form of ``CMD``), its ``#!`` interpreter is one (``#!/bin/sh``, ``#!/usr/bin/env bash``),
  or app.yaml sets ``keep_shell``; the log says which and why. A shell only matters to an
  attacker who already runs code in the VM, but it is the first thing every exploit chain uses.
  busybox itself stays (its other applets are real tools); its shell applet links go.
* setuid/setgid bits are dropped from files (nothing in a single-app VM needs privilege
  escalation); directories keep setgid (it only steers group inheritance);
* world-writable files and non-sticky world-writable directories lose ``o+w``;
* docs, man/info pages and package-manager/pip caches are removed;
* ELF files are stripped with ``strip --strip-unneeded`` when ``strip`` exists (failures ignored:
  not every ELF is strippable); only those with symbols or debug sections, as strip would leave
  the others byte-identical (but rewrite them whole).

Nothing here follows a symlink: the tree is hostile input.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .vminit import INIT_DIR, LaunchSpec

Log = Callable[[str], None]
_STRIP_JOBS = max(2, min(4, os.cpu_count() or 1))

SHELL_NAMES = frozenset(
    {
        "sh",
        "bash",
        "dash",
        "ash",
        "hush",
        "zsh",
        "ksh",
        "mksh",
        "pdksh",
        "csh",
        "tcsh",
        "fish",
        "rbash",
    }
)
BIN_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "usr/local/sbin")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLUTTER = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/gtk-doc",
    "usr/share/lintian",
    "usr/local/share/doc",
    "usr/local/share/man",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/apk",
    "var/cache/yum",
    "var/cache/dnf",
    "var/cache/debconf/templates.dat-old",
    "var/cache/debconf/config.dat-old",
    "root/.cache",
)


@dataclass
class HardenReport:
    shells_removed: list[str] = field(default_factory=list)
    shell_kept_reason: str | None = None
    setid_dropped: list[str] = field(default_factory=list)
    world_writable_fixed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    stripped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "shells_removed": self.shells_removed,
            "shell_kept_reason": self.shell_kept_reason,
            "setid_dropped": self.setid_dropped,
            "world_writable_fixed": self.world_writable_fixed,
            "removed": self.removed,
            "stripped": self.stripped,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under root as (relative path, lstat), never following symlinks."""
    stack = [""]
    while stack:
        rel = stack.pop()
        base = root / rel if rel else root
        try:
            names = sorted(p.name for p in base.iterdir())
        except OSError:
            continue
        for name in names:
            r = f"{rel}/{name}" if rel else name
            try:
                st = os.lstat(root / r)
            except OSError:
                continue
            yield r, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(r)


def tree_bytes(root: Path) -> int:
    """Allocated bytes of a tree (hardlinks counted once), like ``du -s``."""
    seen: set[int] = set()
    total = 0
    for _, st in _walk(root):
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        total += st.st_blocks * 512
    return total


def _inside(root: Path, rel: str) -> Path | None:
    """``root/rel`` when no parent component of ``rel`` is a symlink (the last may be one)."""
    cur = root
    for part in Path(rel).parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            return None
    return cur / Path(rel).name


def _resolve_in_root(root: Path, path: str, hops: int = 0) -> str | None:
    """Resolve an absolute in-image path chroot-style; the final in-image path or None."""
    if hops > 40:
        return None
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    for i, part in enumerate(parts):
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        host = root.joinpath(*resolved, part)
        if host.is_symlink():
            target = str(host.readlink())
            base = "/" if target.startswith("/") else "/" + "/".join(resolved)
            rest = "/".join(parts[i + 1 :])
            return _resolve_in_root(root, f"{base}/{target}/{rest}", hops + 1)
        resolved.append(part)
    return "/" + "/".join(resolved)


def _find_exe(root: Path, argv0: str, path_env: str) -> tuple[str, str] | None:
    """(path as named, resolved in-image path) of argv[0] in the image, or None."""
    candidates = [argv0] if "/" in argv0 else [f"{d}/{argv0}" for d in path_env.split(":") if d]
    for cand in candidates:
        res = _resolve_in_root(root, cand if cand.startswith("/") else "/" + cand)
        if res is not None:
            host = root / res.lstrip("/")
            if host.is_file() and not host.is_symlink():
                return cand, res
    return None


def _is_shell_name(name: str) -> bool:
    return Path(name).name in SHELL_NAMES


def shell_need(root: Path, spec: LaunchSpec) -> str | None:
    """Why the app needs a shell (a sentence for the build log), or None."""
    argv0 = spec.argv[0]
    env = dict(spec.env)
    if _is_shell_name(argv0):
        return f"the command's argv[0] {argv0!r} is a shell (shell-form CMD or `sh -c`)"
    found = _find_exe(root, argv0, env.get("PATH", DEFAULT_PATH))
    if found is None:
        return None
    named, resolved = found
    if Path(resolved).name == "busybox" and _is_shell_name(named):
        return f"the command's argv[0] {argv0!r} is busybox's shell applet"
    try:
        with open(root / resolved.lstrip("/"), "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode(errors="replace").strip()
    words = line.split()
    if not words:
        return None
    interp = words[0]
    if Path(interp).name == "env":
        args = [w for w in words[1:] if not w.startswith("-")]
        interp = args[0] if args else interp
    if _is_shell_name(interp):
        return f"the entrypoint {named} starts with '#!{line}' (a shell script)"
    if Path(interp).name == "busybox" and len(words) > 1 and _is_shell_name(words[1]):
        return f"the entrypoint {named} starts with '#!{line}' (busybox shell)"
    return None


def _remove_shells(root: Path, report: HardenReport, log: Log) -> None:
    for d in BIN_DIRS:
        base = _inside(root, d)
        if base is None or base.is_symlink() or not base.is_dir():
            continue
        for name in sorted(p.name for p in base.iterdir()):
            if name in SHELL_NAMES:
                p = base / name
                if p.is_dir() and not p.is_symlink():
                    continue
                p.unlink()
                report.shells_removed.append(f"/{d}/{name}")
    if report.shells_removed:
        log(f"harden: removed shells {', '.join(report.shells_removed)}")


def _needs_strip(f: BinaryIO) -> bool:
    """Whether ``strip --strip-unneeded`` would change this file: an ELF with a ``.symtab`` or
    debug sections. Most shipped binaries and libraries are stripped already, and strip rewrites
    a file whole even when it removes nothing (measured: 4 of 397 ELF files of the bench image
    change); skipping those gives the same bytes. Anything unparsable (the file is hostile input)
    goes to strip, which decides as before."""
    head = f.read(64)
    if len(head) < 64 or head[:4] != b"\x7fELF":
        return False
    try:
        cls, order = head[4], head[5]
        e = "<" if order == 1 else ">"
        if cls == 2:  # ELF64
            (shoff,) = struct.unpack(e + "Q", head[0x28:0x30])
            shentsize, shnum, shstrndx = struct.unpack(e + "HHH", head[0x3A:0x40])
            fmt, off_at, size_at = e + "IIQQQQIIQQ", 4, 5
        elif cls == 1:  # ELF32
            (shoff,) = struct.unpack(e + "I", head[0x20:0x24])
            shentsize, shnum, shstrndx = struct.unpack(e + "HHH", head[0x2E:0x34])
            fmt, off_at, size_at = e + "IIIIIIIIII", 4, 5
        else:
            return True
        want = struct.calcsize(fmt)
        if shoff == 0 or shnum == 0:
            return False  # no section headers: nothing for strip to remove
        if shentsize < want or shstrndx >= shnum:
            return True
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        if len(table) < shentsize * shnum:
            return True
        sections = [struct.unpack(fmt, table[i * shentsize : i * shentsize + want])
                    for i in range(shnum)]  # fmt: skip
        names_sh = sections[shstrndx]
        if names_sh[size_at] > 1 << 20:
            return True
        f.seek(names_sh[off_at])
        names = f.read(names_sh[size_at])
        for sh in sections:
            start = sh[0]
            end = names.find(b"\0", start)
            name = names[start : end if end >= 0 else len(names)]
            if name == b".symtab" or name.startswith((b".debug", b".zdebug")):
                return True
        return False
    except (struct.error, OSError, ValueError, IndexError):
        return True


def _strip(root: Path, files: list[str], log: Log) -> int:
    strip = shutil.which("strip")
    if strip is None or not files:
        if files:
            log("harden: `strip` not found; binaries left unstripped")
        return 0
    # Several `strip` processes at once: each file is stripped on its own (the result does not
    # depend on the grouping), and one strip process is single-threaded.
    size = max(1, min(100, -(-len(files) // (_STRIP_JOBS * 2))))
    chunks = [files[i : i + size] for i in range(0, len(files), size)]

    def run(chunk: list[str]) -> int:
        # -p keeps times; errors (non-strippable ELF, e.g. other arch) only skip that file
        subprocess.run(
            [strip, "-p", "--strip-unneeded", *[str(root / f) for f in chunk]],
            capture_output=True,
            check=False,
        )
        return len(chunk)

    with ThreadPoolExecutor(_STRIP_JOBS) as pool:
        return sum(pool.map(run, chunks))


def harden(root: Path, spec: LaunchSpec, *, keep_shell: bool, log: Log) -> HardenReport:
    """Harden ``root`` in place for the app ``spec``; returns what changed."""
    report = HardenReport(bytes_before=tree_bytes(root))
    need = shell_need(root, spec)
    if keep_shell:
        report.shell_kept_reason = "app.yaml sets keep_shell"
    elif need:
        report.shell_kept_reason = need
    if report.shell_kept_reason:
        log(f"harden: keeping shells because {report.shell_kept_reason}")
    else:
        _remove_shells(root, report, log)

    for rel in CLUTTER:
        p = _inside(root, rel)
        if p is None or not (p.exists() or p.is_symlink()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        report.removed.append("/" + rel)
    if report.removed:
        log(f"harden: removed {', '.join(report.removed)}")

    elf: list[str] = []
    seen: set[int] = set()
    for rel, st in _walk(root):
        if rel == INIT_DIR or rel.startswith(INIT_DIR + "/"):
            continue
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            continue
        path = root / rel
        new = stat.S_IMODE(mode)
        if stat.S_ISREG(mode) and new & (stat.S_ISUID | stat.S_ISGID):
            new &= ~(stat.S_ISUID | stat.S_ISGID)
            report.setid_dropped.append("/" + rel)
        if new & stat.S_IWOTH and not (stat.S_ISDIR(mode) and new & stat.S_ISVTX):
            new &= ~stat.S_IWOTH
            report.world_writable_fixed.append("/" + rel)
        if new != stat.S_IMODE(mode):
            path.chmod(new)
        if stat.S_ISREG(mode) and st.st_size > 64 and st.st_ino not in seen:
            seen.add(st.st_ino)
            try:
                with open(path, "rb") as f:
                    if _needs_strip(f):
                        elf.append(rel)
            except OSError:
                pass
    if report.setid_dropped:
        log(f"harden: dropped setuid/setgid bits from {len(report.setid_dropped)} files: "
            + ", ".join(report.setid_dropped[:10]))  # fmt: skip
    if report.world_writable_fixed:
        log(f"harden: removed world-write from {len(report.world_writable_fixed)} entries: "
            + ", ".join(report.world_writable_fixed[:10]))  # fmt: skip
    report.stripped = _strip(root, elf, log)
    report.bytes_after = tree_bytes(root)
    log(f"harden: stripped {report.stripped} ELF files; tree {report.bytes_before / 1e6:.1f} MB "
        f"-> {report.bytes_after / 1e6:.1f} MB")  # fmt: skip
    return report
