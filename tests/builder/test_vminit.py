"""The static init, really built and really run (chroot and bubblewrap) over a busybox tree."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from unkey_deploy.builder.vminit import (
    ImageConfig,
    Overrides,
    build_init,
    inject,
    launch_spec,
)
from unkey_deploy.core.errors import BuildFailed, ImageError

pytestmark = pytest.mark.root
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"

SCRIPT = (
    'echo "uid=$(id -u) gid=$(id -g) groups=$(id -G) cwd=$(pwd) foo=$FOO bar=$BAR args=$*"; exit 7'
)


def _tree(
    make_tree: Callable[..., Path], tmp_path: Path, init: Path, cfg: ImageConfig,
    ov: Overrides | None = None,
) -> Path:  # fmt: skip
    root = make_tree(tmp_path / "root")
    inject(root, launch_spec(root, cfg, ov), init)
    return root


def test_build_init_is_static_and_idempotent(tmp_path: Path) -> None:
    out = build_init(tmp_path)
    mtime = out.stat().st_mtime_ns
    assert build_init(tmp_path) == out and out.stat().st_mtime_ns == mtime
    file = subprocess.run(
        ["file", "-b", str(out)], capture_output=True, text=True, check=False
    ).stdout
    assert "statically linked" in file or "static-pie" in file
    assert out.stat().st_size < 2_000_000


def test_chroot_applies_env_cwd_user_and_propagates_exit_code(
    tmp_path: Path, init_binary: Path, make_tree: Callable[..., Path]
) -> None:
    cfg = ImageConfig(
        entrypoint=("/bin/busybox", "sh", "-c", SCRIPT, "app"),
        cmd=("one", "two"),
        env=("FOO=from-image", "BAR=image", "PATH=/bin"),
        working_dir="/app",
        user="app",
    )
    root = _tree(make_tree, tmp_path, init_binary, cfg, Overrides(env={"BAR": "override"}))
    assert (root / ".vminit/user").read_text() == "1000:1000:2000"
    proc = subprocess.run([CHROOT, str(root), "/.vminit/init"], capture_output=True, text=True,
                          timeout=30, env={}, check=False)  # fmt: skip
    assert proc.returncode == 7, proc.stderr
    assert "uid=1000 gid=1000 groups=1000 2000 cwd=/app foo=from-image bar=override" in proc.stdout
    assert "args=one two" in proc.stdout
    assert "app exited with status 7" in proc.stderr


def test_bwrap_as_pid1_mounts_tolerated_and_exit_code(
    tmp_path: Path, init_binary: Path, make_tree: Callable[..., Path]
) -> None:
    bwrap = shutil.which("bwrap")
    assert bwrap, "bubblewrap is a declared dependency"
    script = 'echo "pid=$$ host=$(cat /proc/sys/kernel/hostname)"; test -d /proc/self; exit 3'
    cfg = ImageConfig(entrypoint=("/bin/sh", "-c", script), env=("HOSTNAME=unkey-test-vm",))
    root = _tree(make_tree, tmp_path, init_binary, cfg)
    # fmt: off
    cmd = [bwrap, "--unshare-user", "--uid", "0", "--gid", "0", "--unshare-pid", "--as-pid-1",
           "--unshare-uts", "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev",
           "--tmpfs", "/tmp", "--clearenv", "/.vminit/init"]
    # fmt: on
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "host=unkey-test-vm" in proc.stdout
    assert "pid=2" in proc.stdout  # init is PID 1, the app its child


def test_sigterm_is_forwarded_to_the_app(
    tmp_path: Path, init_binary: Path, make_tree: Callable[..., Path]
) -> None:
    script = 'trap "echo got-term; exit 42" TERM; echo ready; while :; do sleep 0.05; done'
    cfg = ImageConfig(entrypoint=("/bin/sh", "-c", script))
    root = _tree(make_tree, tmp_path, init_binary, cfg)
    proc = subprocess.Popen([CHROOT, str(root), "/.vminit/init"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 42
    assert "got-term" in out


def test_missing_command_and_execve_failure(
    tmp_path: Path, init_binary: Path, make_tree: Callable[..., Path]
) -> None:
    root = _tree(make_tree, tmp_path, init_binary, ImageConfig(entrypoint=("/nope",)))
    proc = subprocess.run([CHROOT, str(root), "/.vminit/init"], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    assert proc.returncode == 127
    assert "execve /nope" in proc.stderr


def test_launch_spec_overrides_and_errors(tmp_path: Path, make_tree: Callable[..., Path]) -> None:
    root = make_tree(tmp_path / "r")
    cfg = ImageConfig(entrypoint=("/e",), cmd=("c",), env=("A=1",), user="1234:55")
    spec = launch_spec(root, cfg, Overrides(args=("x", "y")))
    assert spec.argv == ("/e", "x", "y") and (spec.uid, spec.gid) == (1234, 55)
    assert launch_spec(root, cfg, Overrides(command=("/bin/app",))).argv == ("/bin/app",)
    with pytest.raises(BuildFailed, match="nothing to run"):
        launch_spec(root, ImageConfig())
    with pytest.raises(ImageError, match="no user 'ghost'"):
        launch_spec(root, ImageConfig(cmd=("/x",), user="ghost"))
    # a passwd that is a symlink to the host's is never read
    (root / "etc/passwd").unlink()
    (root / "etc/passwd").symlink_to("/etc/passwd")
    with pytest.raises(ImageError, match="no user 'root'"):
        launch_spec(root, ImageConfig(cmd=("/x",), user="root"))
    with pytest.raises(ImageError, match="Entrypoint"):
        ImageConfig.from_oci({"Entrypoint": "not-a-list"})


@pytest.mark.parametrize(
    "user", ["4294967296", "4294967295", "1000:4294967296", "big", "app:99999999999"]
)
def test_an_out_of_range_user_or_group_id_is_refused_at_build_time(
    tmp_path: Path, make_tree: Callable[..., Path], user: str
) -> None:
    """uid/gid are 32-bit and 2**32-1 means "no change" to setuid(2): an image ``User`` of
    4294967296 was written as is, and the init's setuid((uid_t)4294967296) is setuid(0), so the
    app ran as root while the build record said otherwise (4294967295 failed with EINVAL and
    the init kept root as well). The build refuses such ids, naming them."""
    root = make_tree(tmp_path / "r")
    with (root / "etc/passwd").open("a") as f:
        f.write("big:x:4294967296:0::/:/bin/sh\n")
    with pytest.raises(ImageError, match="out of range"):
        launch_spec(root, ImageConfig(cmd=("/x",), user=user))


def test_an_image_whose_etc_is_not_a_directory_gets_a_clear_user_error(
    tmp_path: Path, make_tree: Callable[..., Path]
) -> None:
    """Looking up ``User`` in /etc/passwd when the image's /etc is a file raised a raw
    NotADirectoryError (the build failed as an internal error and was retried); it is the
    same "no user" ImageError as a missing /etc/passwd, and numeric users still resolve."""
    root = make_tree(tmp_path / "r")
    shutil.rmtree(root / "etc")
    (root / "etc").write_text("not a directory\n")
    with pytest.raises(ImageError, match="no user 'app'"):
        launch_spec(root, ImageConfig(cmd=("/x",), user="app"))
    spec = launch_spec(root, ImageConfig(cmd=("/x",), user="1000:1000"))
    assert (spec.uid, spec.gid) == (1000, 1000)
