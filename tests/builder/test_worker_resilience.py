"""A builder worker thread survives errors in its own loop (database hiccups) and keeps building.

Before, any exception outside a build (e.g. SQLite "database is locked" while claiming) ended the
worker thread silently: builderd kept running with no workers and queued builds waited forever.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.builder.api import BuildRequest, BuildState, SourceImage
from unkey_deploy.builder.service import BuildService, OciImageSource
from unkey_deploy.core.clock import FakeClock
from unkey_deploy.core.ids import new_customer_id
from unkey_deploy.store import jobs
from unkey_deploy.store.db import make_engine, session_factory, transaction, upgrade

pytestmark = pytest.mark.root


def test_worker_outlives_database_errors_while_claiming(
    tmp_path: Path, init_binary: Path, app_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    upgrade(engine)
    factory = session_factory(engine)
    assets = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
    svc = BuildService(factory, assets, OciImageSource(local_sources=True),
                       work_dir=tmp_path / "work", init_binary=init_binary,
                       poll_s=0.05)  # fmt: skip
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


class _GatedSource(OciImageSource):
    """The real source; each extraction (one per attempt) waits until the test opens its gate."""

    def __init__(self) -> None:
        super().__init__(local_sources=True)  # (the tests build oci: layouts)
        self.entered = [threading.Event() for _ in range(3)]
        self.gates = [threading.Event() for _ in range(3)]
        self.calls = 0

    def extract(self, image: SourceImage, root: Path, log: Any, /, progress: Any = None) -> None:
        i = self.calls
        self.calls += 1
        self.entered[i].set()
        while not self.gates[i].wait(0.05):
            log(f"extract: attempt {i + 1} waiting")  # a log line is a cancellation point
        super().extract(image, root, log, progress=progress)


def test_a_worker_that_lost_its_lease_leaves_the_next_attempt_alone(
    tmp_path: Path, init_binary: Path, app_image: str
) -> None:
    """Worker A stalls past its lease; the job goes back to the queue and worker B runs attempt
    2. When A notices (its next heartbeat), it stops: it must not delete B's scratch directory,
    nor write "cancelled" into a build nobody cancelled, nor fail in its own worker loop."""
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    upgrade(engine)
    factory = session_factory(engine)
    clock = FakeClock()
    assets = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
    source = _GatedSource()
    svc = BuildService(factory, assets, source, work_dir=tmp_path / "work", clock=clock,
                       init_binary=init_binary, poll_s=0.05, lease_s=0.9)  # fmt: skip
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            svc.run_worker(name, once=True)
        except BaseException as e:  # asserted below
            errors.append(e)

    bid = svc.submit(BuildRequest(app_image, new_customer_id()))
    a = threading.Thread(target=worker, args=("A",))
    b = threading.Thread(target=worker, args=("B",))
    try:
        a.start()
        assert source.entered[0].wait(60)
        with transaction(factory) as s:  # A's lease expired (it stalled): back to the queue
            assert jobs.requeue_expired(s, now=clock.time_ns() / 1e9 + 3600, kinds=["build"])
        b.start()
        assert source.entered[1].wait(60)
        scratch = tmp_path / "work" / bid / "attempt-2" / "root"
        assert scratch.is_dir()
        a.join(60)  # A's next heartbeat finds the job is B's: A stops
        assert not a.is_alive()
        assert scratch.is_dir(), "the stale worker deleted the running attempt's scratch"
        source.gates[1].set()
        b.join(120)
        assert not b.is_alive()
    finally:
        for g in source.gates:
            g.set()
        a.join(60)
        b.join(60)
        engine.dispose()
    assert not errors, errors
    build = svc.get(bid)
    assert build.state == BuildState.SUCCEEDED and build.attempts == 2, build.error
    assert "cancelled" not in build.log and "cancel requested" not in build.log
    assert not (tmp_path / "work" / bid).exists()  # and every attempt's scratch is gone


class _SlowSource(OciImageSource):
    """The real source; extraction first waits ``delay`` seconds (several heartbeats)."""

    def __init__(self, delay: float) -> None:
        super().__init__(local_sources=True)  # (the tests build oci: layouts)
        self.delay = delay

    def extract(self, image: SourceImage, root: Path, log: Any, /, progress: Any = None) -> None:
        time.sleep(self.delay)
        super().extract(image, root, log, progress=progress)


def test_a_heartbeat_outlives_a_database_hiccup(
    tmp_path: Path, init_binary: Path, app_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One failed heartbeat (SQLite "database is locked") ended the heartbeat thread: the
    build went on without a lease, another worker re-queued it and built it again in parallel
    (attempt 2) while the first still ran. The heartbeat now retries at its next beat."""
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    upgrade(engine)
    factory = session_factory(engine)
    assets = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
    # heartbeats at 1 s (fails), 2 s, ...; the lease taken at 0 s would run out at 3 s
    svc = BuildService(factory, assets, _SlowSource(4.5), work_dir=tmp_path / "work",
                       init_binary=init_binary, poll_s=0.05, lease_s=3.0)  # fmt: skip
    real_heartbeat = jobs.heartbeat
    failures = {"left": 1}

    def flaky_heartbeat(*a: Any, **kw: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OperationalError("UPDATE jobs ...", {}, Exception("database is locked"))
        return real_heartbeat(*a, **kw)

    monkeypatch.setattr(jobs, "heartbeat", flaky_heartbeat)
    try:
        bid = svc.submit(BuildRequest(app_image, new_customer_id()))
        svc.start(2)
        b = svc.wait(bid, 120)
    finally:
        svc.stop()
        engine.dispose()
    assert failures["left"] == 0  # the hiccup really happened
    assert b.state == BuildState.SUCCEEDED, b.error
    assert b.attempts == 1, b.log
