"""Builder test fixtures: the compiled init and small busybox-based image trees."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from unkey_deploy.builder.vminit import build_init

BUSYBOX = Path("/bin/busybox")


@pytest.fixture(scope="session")
def init_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_init(tmp_path_factory.mktemp("native"))


APPLETS = ("sh", "ash", "id", "pwd", "echo", "sleep", "env", "cat")


def busybox_tree(root: Path, applets: tuple[str, ...] = APPLETS) -> Path:
    """A tiny image tree: busybox-static, applet links, passwd/group with an `app` user."""
    for d in ("bin", "etc", "app", "tmp", "usr/share/doc/pkg", "usr/share/man/man1"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for a in applets:
        (root / "bin" / a).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/app:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app\n")
    (root / "usr/share/doc/pkg/README").write_text("docs\n")
    (root / "usr/share/man/man1/x.1").write_text("man\n")
    (root / "tmp").chmod(0o1777)
    return root


@pytest.fixture
def make_tree() -> Callable[..., Path]:
    return busybox_tree
