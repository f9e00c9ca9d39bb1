"""A builder worker thread survives errors in its own loop (database hiccups) and keeps building.

Before, any exception outside a build (e.g. SQLite "database is locked" while claiming) ended the
worker thread silently: builderd kept running with no workers and queued builds waited forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.builder.api import BuildRequest, BuildState
from unkey_deploy.builder.service import BuildService, OciImageSource
from unkey_deploy.core.ids import new_customer_id
from unkey_deploy.store import jobs
from unkey_deploy.store.db import make_engine, session_factory, upgrade

pytestmark = pytest.mark.root


def test_worker_outlives_database_errors_while_claiming(
    tmp_path: Path, init_binary: Path, app_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    upgrade(engine)
    factory = session_factory(engine)
    assets = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
    svc = BuildService(factory, assets, OciImageSource(), work_dir=tmp_path / "work",
                       init_binary=init_binary, poll_s=0.05)  # fmt: skip
    real_claim = jobs.claim
    failures = {"left": 3}

    def flaky_claim(*a: Any, **kw: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OperationalError("UPDATE jobs ...", {}, Exception("database is locked"))
        return real_claim(*a, **kw)

    monkeypatch.setattr(jobs, "claim", flaky_claim)  # the module builderd calls through
    try:
        bid = svc.submit(BuildRequest(app_image, new_customer_id()))
        svc.start(1)
        b = svc.wait(bid, 120)
        assert failures["left"] == 0  # the errors really happened in the worker loop
        assert b.state == BuildState.SUCCEEDED, b.error
        assert all(t.is_alive() for t in svc._threads)
    finally:
        svc.stop()
        engine.dispose()
