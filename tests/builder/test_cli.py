"""``unkey build`` as a user runs it: a real process over OCI layouts, good and hostile."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.root


def _unkey(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(home / "cache"), "UNKEY_DATA_DIR": str(home)}
    return subprocess.run([sys.executable, "-m", "unkey_deploy.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=240, check=False)  # fmt: skip


def test_build_json_and_reproducible(tmp_path: Path, app_image: str) -> None:
    a = _unkey("build", app_image, "--output", str(tmp_path / "a"), "--json", home=tmp_path)
    assert a.returncode == 0, a.stderr
    meta = json.loads(a.stdout)
    asset = Path(meta["asset"])
    assert asset.name == "rootfs.ext4.zst" and asset.exists()
    assert meta["compressed_sha256"] == hashlib.sha256(asset.read_bytes()).hexdigest()
    assert meta["manifest_digest"].startswith("sha256:") and meta["build_id"].startswith("bld_")
    assert meta["launch"]["argv"] == ["/app/server", "--port", "8080"]
    assert meta["harden"]["shells_removed"] == ["/bin/sh"]
    assert json.loads((tmp_path / "a" / "asset.json").read_text())["asset"] == str(asset)
    b = _unkey("build", app_image, "--output", str(tmp_path / "b"), home=tmp_path)
    assert b.returncode == 0, b.stderr
    assert b.stdout.strip() == str((tmp_path / "b" / "rootfs.ext4.zst").resolve())
    assert "harden: removed shells /bin/sh" in b.stderr
    assert meta["ext4_sha256"] == json.loads((tmp_path / "b/asset.json").read_text())["ext4_sha256"]
    assert [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".build-")] == []


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ([("../escape.txt", b"x", 0o644, None)], '"../escape.txt"'),
        ([("link", None, 0o777, "/etc"), ("link/shadow-copy", b"x", 0o644, None)], None),
    ],
)
def test_hostile_image_exits_nonzero_naming_layer_and_entry(
    tmp_path: Path,
    entries: list[tuple[str, bytes | None, int, str | None]],
    needle: str | None,
    oci_layout: Callable[..., str],
) -> None:
    ref = oci_layout(tmp_path / "evil", {"Entrypoint": ["/x"]},
                           [[("x", b"#", 0o755, None)], entries])  # fmt: skip
    before = set(os.listdir("/etc"))
    r = _unkey("build", ref, "--output", str(tmp_path / "out"), home=tmp_path)
    assert set(os.listdir("/etc")) == before and not (tmp_path / "escape.txt").exists()
    if needle is None:
        # a write through an absolute symlink lands inside the root, never in the host's /etc:
        # the build succeeds (that is what real images need) and the host is untouched
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 10, r.stderr
    assert "layer sha256:" in r.stderr and needle in r.stderr
    assert not (tmp_path / "out" / "rootfs.ext4.zst").exists()
