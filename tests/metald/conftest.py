"""Fixtures for metald: the guest kernel, a database, a private subnet, metald instances."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from unkey_deploy.core.config import MetaldConfig
from unkey_deploy.metald.kernel import KernelPaths, prepare_kernel
from unkey_deploy.metald.service import Metald
from unkey_deploy.store.db import make_engine, upgrade
from unkey_deploy.testing.rootfs import build_test_rootfs
from unkey_deploy.testing.subnets import reserved_subnet

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def kernel() -> KernelPaths:
    native = Path(os.environ.get("UNKEY_NATIVE_DIR", REPO / ".native"))
    return prepare_kernel(native)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def subnet() -> Iterator[str]:
    """A /24 out of 172.31.64.0-172.31.255.0 that no other test worker holds right now."""
    with reserved_subnet() as net:
        yield net


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return build_test_rootfs(tmp_path / "image" / "rootfs.ext4", port=8080)


MetaldFactory = Callable[..., Metald]


@pytest.fixture
def make_metald(
    tmp_path: Path, engine: Engine, subnet: str, kernel: KernelPaths
) -> Iterator[MetaldFactory]:
    made: list[Metald] = []

    def factory(driver: str, name: str = "h1", **kw: object) -> Metald:
        kw.setdefault("stop_timeout_s", 0.5)
        cfg = MetaldConfig(
            driver=driver,  # type: ignore[arg-type]
            host_name=name,
            subnet=subnet,
            **kw,  # type: ignore[arg-type]
        )
        md = Metald(cfg, engine, tmp_path / f"metald-{name}", kernel=kernel)
        made.append(md)
        return md

    yield factory
    for md in made:
        md.shutdown()
