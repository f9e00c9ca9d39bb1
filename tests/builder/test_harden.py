"""Hardening policy on real busybox trees: shells, setid bits, world-write, clutter, strip."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from unkey_deploy.builder.harden import harden, shell_need
from unkey_deploy.builder.vminit import ImageConfig, LaunchSpec, launch_spec


def _spec(root: Path, *argv: str) -> LaunchSpec:
    return launch_spec(root, ImageConfig(entrypoint=argv))


def test_shells_removed_and_everything_else_hardened(
    tmp_path: Path, make_tree: Callable[..., Path]
) -> None:
    root = make_tree(tmp_path / "r")
    (root / "bin/bash").write_text("fake bash")
    app = root / "app/server"
    (tmp_path / "m.c").write_text("int main(void) { return 0; }\n")
    # a real ELF with debug info and symbols to strip
    subprocess.run(["gcc", "-g", "-o", str(app), str(tmp_path / "m.c")], check=True)
    app.chmod(0o4755 | stat.S_IWOTH)
    (root / "app/data").mkdir()
    (root / "app/data").chmod(0o777)
    (root / "var/cache/apt").mkdir(parents=True)
    (root / "var/cache/apt/pkgcache.bin").write_bytes(b"x" * 10000)
    # a symlinked clutter dir pointing elsewhere must not be followed
    (root / "keep").mkdir()
    (root / "keep/file").write_text("precious")
    (root / "root").mkdir()
    (root / "root/.cache").symlink_to("/keep")
    # an ELF without symbols or debug sections: strip would rewrite it byte-identical, so it is
    # left alone (same inode: strip writes a new file and renames it over); and a broken ELF
    subprocess.run(["gcc", "-s", "-o", str(root / "app/slim"), str(tmp_path / "m.c")], check=True)
    slim = (root / "app/slim").lstat()
    (root / "app/broken").write_bytes(b"\x7fELF\x02\x01" + b"\xff" * 200)
    before = app.stat().st_size
    lines: list[str] = []
    report = harden(root, _spec(root, "/app/server"), keep_shell=False, log=lines.append)

    assert sorted(report.shells_removed) == ["/bin/ash", "/bin/bash", "/bin/sh"]
    assert not (root / "bin/sh").exists() and not (root / "bin/sh").is_symlink()
    assert (root / "bin/busybox").exists() and (root / "bin/id").is_symlink()
    mode = app.stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH)
    assert stat.S_IMODE((root / "app/data").stat().st_mode) == 0o775
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777  # sticky: left alone
    assert not (root / "usr/share/doc").exists() and not (root / "usr/share/man").exists()
    assert not (root / "var/cache/apt").exists()
    assert (root / "keep/file").read_text() == "precious"
    assert not (root / "root/.cache").is_symlink()
    assert app.stat().st_size < before and report.stripped >= 1
    after = (root / "app/slim").lstat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        slim.st_ino, slim.st_size, slim.st_mtime_ns,
    )  # fmt: skip
    assert (root / "app/broken").read_bytes().startswith(b"\x7fELF")  # strip failed: left as is
    assert report.bytes_after < report.bytes_before
    assert any("removed shells" in line for line in lines)
    assert any("MB ->" in line for line in lines)


def test_shell_kept_when_the_entrypoint_needs_one(
    tmp_path: Path, make_tree: Callable[..., Path]
) -> None:
    root = make_tree(tmp_path / "r")
    script = root / "app/start.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    env_script = root / "app/run"
    env_script.write_text("#!/usr/bin/env bash\n")
    env_script.chmod(0o755)
    py = root / "app/main.py"
    py.write_text("#!/usr/bin/python3\n")
    py.chmod(0o755)
    assert "starts with '#!/bin/sh'" in (shell_need(root, _spec(root, "/app/start.sh")) or "")
    assert "#!/usr/bin/env bash" in (shell_need(root, _spec(root, "/app/run")) or "")
    assert "is a shell" in (shell_need(root, _spec(root, "sh", "-c", "x")) or "")
    assert shell_need(root, _spec(root, "/app/main.py")) is None
    lines: list[str] = []
    report = harden(root, _spec(root, "/app/start.sh"), keep_shell=False, log=lines.append)
    assert report.shells_removed == [] and (root / "bin/sh").is_symlink()
    assert any("keeping shells because the entrypoint /app/start.sh" in x for x in lines)
    report = harden(root, _spec(root, "/app/main.py"), keep_shell=True, log=lines.append)
    assert report.shell_kept_reason == "app.yaml sets keep_shell" and (root / "bin/sh").exists()
