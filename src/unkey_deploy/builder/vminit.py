"""The static guest init (``vminit.c``): building it, and writing its launch files into a tree.

``build_init(native_dir)`` compiles ``vminit.c`` with ``gcc -static -Os -s`` into
``<native_dir>/vminit/init`` (idempotent: rebuilt only when the source changes). ``inject(root,
spec, init)`` copies it to ``/.vminit/init`` and writes ``/.vminit/{argv,env,cwd,user}`` (the
contract is in the header comment of ``vminit.c``). ``launch_spec`` turns the image config plus
app.yaml overrides into those values, resolving ``User`` to numeric ids with the image's own
``/etc/passwd`` and ``/etc/group``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import BuildFailed, ImageError

SOURCE = Path(__file__).with_name("vminit.c")
INIT_DIR = ".vminit"


def build_init(native_dir: Path) -> Path:
    """Compile the static init into ``<native_dir>/vminit/init``; no-op when up to date."""
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()
    out_dir = Path(native_dir) / "vminit"
    out = out_dir / "init"
    stamp = out_dir / "init.sha256"
    if out.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_out = Path(tmp) / "init"
        proc = subprocess.run(
            ["gcc", "-static", "-Os", "-s", "-Wall", "-o", str(tmp_out), str(SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BuildFailed(
                f"cannot compile the guest init: {proc.stderr.strip()[-800:]}",
                suggestion="install gcc and the static libc (libc6-dev) and run `make native`",
            )
        tmp_out.replace(out)  # atomic: concurrent builders never see a partial binary
    stamp.write_text(digest + "\n")
    return out


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image config that decide how the app starts."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()

    @classmethod
    def from_oci(cls, cfg: Mapping[str, object] | None) -> ImageConfig:
        """From the ``config`` object of an OCI/Docker image config blob (missing keys allowed)."""
        cfg = cfg or {}

        def strs(key: str) -> tuple[str, ...]:
            v = cfg.get(key)
            if v is None:
                return ()
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ImageError(f"image config {key} must be a list of strings, got {v!r:.80}")
            return tuple(v)

        ports = cfg.get("ExposedPorts") or {}
        wd, user = cfg.get("WorkingDir") or "", cfg.get("User") or ""
        if not isinstance(wd, str) or not isinstance(user, str) or not isinstance(ports, dict):
            raise ImageError("image config WorkingDir/User/ExposedPorts have the wrong type")
        return cls(strs("Entrypoint"), strs("Cmd"), strs("Env"), wd, user, tuple(sorted(ports)))


@dataclass(frozen=True)
class Overrides:
    """app.yaml's say over the image config."""

    command: tuple[str, ...] | None = None  # replaces Entrypoint + Cmd
    args: tuple[str, ...] | None = None  # replaces Cmd only
    env: Mapping[str, str] = field(default_factory=dict)
    keep_shell: bool = False


@dataclass(frozen=True)
class LaunchSpec:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "argv": list(self.argv),
            "env": dict(self.env),
            "cwd": self.cwd,
            "user": f"{self.uid}:{self.gid}",
            "groups": list(self.groups),
        }


def _read_inside(root: Path, rel: str) -> str | None:
    """Read ``root/rel`` without following any symlink (an image could point /etc/passwd at
    the host's files); None when absent or not a plain file."""
    cur = root
    for part in Path(rel).parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except (FileNotFoundError, NotADirectoryError):  # absent, or a parent is a file
            return None
        if stat.S_ISLNK(st.st_mode):
            return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > 4 * 1024 * 1024:
        return None
    fd = os.open(cur, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _table(text: str | None) -> list[list[str]]:
    if not text:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


MAX_ID = 2**32 - 2
"""The largest uid/gid (32-bit; 2**32-1 is setuid(2)'s "leave unchanged")."""


def resolve_user(root: Path, user: str) -> tuple[int, int, tuple[int, ...]]:
    """``User`` (``name``, ``uid``, ``name:group``, ``uid:gid``...) -> numeric uid, gid, groups."""
    if not user:
        return 0, 0, ()
    name, _, group = user.partition(":")
    passwd = _table(_read_inside(root, "etc/passwd"))
    groups = _table(_read_inside(root, "etc/group"))
    uid: int | None = None
    gid = 0  # runc's default for a uid without a passwd entry
    uname: str | None = None
    for row in passwd:
        named = len(row) >= 4 and (row[0] == name or (name.isdigit() and row[2] == name))
        if named and row[2].isdigit() and row[3].isdigit():
            uid, gid, uname = int(row[2]), int(row[3]), row[0]
            break
    if uid is None:
        if not name.isdigit():
            raise ImageError(
                f"image User {user!r}: no user {name!r} in the image's /etc/passwd",
                suggestion="use a numeric uid:gid in the image or add the user",
            )
        uid = int(name)
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = [r for r in groups if len(r) >= 3 and r[0] == group and r[2].isdigit()]
            if not match:
                raise ImageError(f"image User {user!r}: no group {group!r} in /etc/group")
            gid = int(match[0][2])
    for what, n in (("uid", uid), ("gid", gid)):
        if n > MAX_ID:  # setuid((uid_t)2**32) is setuid(0); 2**32-1 is "leave unchanged"
            raise ImageError(f"image User {user!r}: {what} {n} out of range (0-{MAX_ID})")
    supplementary: list[int] = []
    if uname is not None:
        for r in groups:
            if len(r) >= 4 and r[2].isdigit() and uname in r[3].split(","):
                g = int(r[2])
                if g != gid and g not in supplementary and g <= MAX_ID:
                    supplementary.append(g)
    return uid, gid, tuple(supplementary)


def launch_spec(root: Path, config: ImageConfig, overrides: Overrides | None = None) -> LaunchSpec:
    """What the init must run: image config with app.yaml overrides applied."""
    ov = overrides or Overrides()
    if ov.command is not None:
        argv = tuple(ov.command) + (tuple(ov.args) if ov.args is not None else ())
    else:
        cmd = tuple(ov.args) if ov.args is not None else config.cmd
        argv = config.entrypoint + cmd
    if not argv or not argv[0]:
        raise BuildFailed(
            "nothing to run: the image has no Entrypoint/Cmd and app.yaml sets no command",
            suggestion="set `command:` in app.yaml",
        )
    env: dict[str, str] = {}
    for item in config.env:
        k, sep, v = item.partition("=")
        if sep and k:
            env[k] = v
    env.update(ov.env)
    for s in (*argv, *env, *env.values()):
        if "\0" in s:
            raise BuildFailed("command and env must not contain NUL bytes")
    uid, gid, groups = resolve_user(root, config.user)
    return LaunchSpec(argv, tuple(env.items()), config.working_dir or "/", uid, gid, groups)


def inject(root: Path, spec: LaunchSpec, init: Path) -> None:
    """Write ``/.vminit/{init,argv,env,cwd,user}`` into ``root`` (replacing an image's own)."""
    d = root / INIT_DIR
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        d.unlink()
    elif d.is_dir():
        shutil.rmtree(d)
    d.mkdir(mode=0o755)
    shutil.copyfile(init, d / "init")
    (d / "init").chmod(0o755)
    (d / "argv").write_bytes(b"".join(a.encode() + b"\0" for a in spec.argv))
    (d / "env").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in spec.env))
    (d / "cwd").write_text(spec.cwd)
    user = f"{spec.uid}:{spec.gid}"
    if spec.groups:
        user += ":" + ",".join(str(g) for g in spec.groups)
    (d / "user").write_text(user)
    for name in ("argv", "env", "cwd", "user"):
        (d / name).chmod(0o644)
