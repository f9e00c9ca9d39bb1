"""The build cache is keyed by the injected init too: a new init rebuilds, the same one reuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.builder.api import BuildRequest, BuildState
from unkey_deploy.builder.service import BuildService, OciImageSource
from unkey_deploy.core.ids import new_customer_id
from unkey_deploy.store.db import make_engine, session_factory, upgrade

pytestmark = pytest.mark.root


def test_changed_init_is_not_served_from_the_cache(
    tmp_path: Path, init_binary: Path, app_image: str
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    upgrade(engine)
    factory = session_factory(engine)
    assets = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
    newer = tmp_path / "init-v2"
    shutil.copyfile(init_binary, newer)
    with newer.open("ab") as f:  # a different init binary (still a runnable ELF)
        f.write(b"\0v2")

    customer = new_customer_id()  # one customer: a cache hit then returns their own asset

    def build(init: Path) -> tuple[str | None, bool]:
        svc = BuildService(factory, assets, OciImageSource(local_sources=True),
                           work_dir=tmp_path / "work", init_binary=init, poll_s=0.05)  # fmt: skip
        svc.start(1)
        try:
            b = svc.wait(svc.submit(BuildRequest(app_image, customer)), 120)
        finally:
            svc.stop()
        assert b.state == BuildState.SUCCEEDED, b.error
        return b.asset_id, b.cached

    first, cached = build(init_binary)
    assert not cached
    again, cached = build(init_binary)
    assert cached and again == first
    other, cached = build(newer)
    assert not cached and other != first
    blob = assets.local_path(other).read_bytes()  # type: ignore[arg-type]
    assert blob[:4] == b"\x28\xb5\x2f\xfd"
    engine.dispose()
