"""The persistent job queue, against SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from unkey_deploy.core.errors import IllegalTransition
from unkey_deploy.store import db, jobs


@pytest.fixture(params=["sqlite", "postgres"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'control.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine: Engine = db.make_engine(url)
    db.upgrade(engine)
    yield db.session_factory(engine)
    engine.dispose()


@pytest.fixture
def kind() -> str:
    """A job kind of this test alone: the PostgreSQL database is shared by the tests of a worker."""
    return f"k-{uuid.uuid4().hex[:12]}"


def test_priority_then_age_and_dedupe(factory: sessionmaker[Session], kind: str) -> None:
    with db.transaction(factory) as s:
        low = jobs.enqueue(s, kind, {"n": 1}, now=1.0, priority=0)
        high = jobs.enqueue(s, kind, {"n": 2}, now=2.0, priority=10)
        again = jobs.enqueue(s, kind, {"n": 3}, now=3.0, priority=10, dedupe_key="img@sha")
        same = jobs.enqueue(s, kind, {"n": 4}, now=4.0, dedupe_key="img@sha")
    assert same.id == again.id and same.payload == {"n": 3}
    order = [jobs.claim(factory, [kind], "w", now=5.0) for _ in range(4)]
    assert [j.id if j else None for j in order] == [high.id, again.id, low.id, None]


def test_concurrent_workers_never_share_a_job(factory: sessionmaker[Session], kind: str) -> None:
    with db.transaction(factory) as s:
        ids = {jobs.enqueue(s, kind, {"i": i}, now=float(i)).id for i in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := jobs.claim(factory, [kind], name, now=100.0)) is not None:
            with lock:
                claimed.append(job.id)
            with db.transaction(factory) as s:
                jobs.complete(s, job.id, name, now=101.0, result={"by": name})

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # every job exactly once
    with factory() as s:
        assert all(j.state is jobs.JobState.SUCCEEDED for j in jobs.list_jobs(s, kind))


def test_crashed_worker_job_is_requeued_then_fails_after_max_attempts(
    factory: sessionmaker[Session], kind: str
) -> None:
    with db.transaction(factory) as s:
        job = jobs.enqueue(s, kind, {}, now=0.0, max_attempts=2)
    first = jobs.claim(factory, [kind], "dead-worker", now=1.0, lease_s=5)
    assert first is not None and first.attempts == 1
    with db.transaction(factory) as s:
        assert jobs.requeue_expired(s, kinds=[kind], now=5.0) == []  # lease still valid
        (requeued,) = jobs.requeue_expired(s, kinds=[kind], now=7.0)
    assert requeued.state is jobs.JobState.QUEUED
    second = jobs.claim(factory, [kind], "w2", now=8.0, lease_s=5)
    assert second is not None and second.id == job.id and second.attempts == 2
    with db.transaction(factory) as s:
        (dead,) = jobs.requeue_expired(s, kinds=[kind], now=20.0)
    assert dead.state is jobs.JobState.FAILED and "2 attempts" in (dead.error or "")
    with db.transaction(factory) as s, pytest.raises(IllegalTransition):
        jobs.complete(s, job.id, "w2", now=21.0)  # the lease was lost: no late completion


def test_fail_retries_with_backoff_and_cancel(factory: sessionmaker[Session], kind: str) -> None:
    with db.transaction(factory) as s:
        job = jobs.enqueue(s, kind, {}, now=0.0, max_attempts=3)
    claimed = jobs.claim(factory, [kind], "w", now=1.0)
    assert claimed is not None
    with db.transaction(factory) as s:
        retried = jobs.fail(s, job.id, "w", "registry 503", now=2.0, backoff_s=10)
    assert retried.state is jobs.JobState.QUEUED
    assert retried.not_before == 12.0  # the snapshot says when the retry comes (now + backoff)
    assert jobs.claim(factory, [kind], "w", now=5.0) is None  # backing off
    running = jobs.claim(factory, [kind], "w", now=13.0)
    assert running is not None
    with db.transaction(factory) as s:
        assert jobs.cancel(s, job.id, now=14.0).cancel_requested
        hb = jobs.heartbeat(s, job.id, "w", now=15.0, lease_s=30)
        assert hb.cancel_requested
        assert jobs.acknowledge_cancel(s, job.id, "w", now=16.0).state is jobs.JobState.CANCELLED
        with pytest.raises(IllegalTransition):
            jobs.cancel(s, job.id, now=17.0)
    with db.transaction(factory) as s:
        q = jobs.enqueue(s, kind, {}, now=20.0)
        assert jobs.cancel(s, q.id, now=21.0).state is jobs.JobState.CANCELLED
    with db.transaction(factory) as s:
        bad = jobs.enqueue(s, kind, {}, now=30.0, max_attempts=3)
    c = jobs.claim(factory, [kind], "w", now=31.0)
    assert c is not None and c.id == bad.id
    with db.transaction(factory) as s:
        final = jobs.fail(s, bad.id, "w", "hostile image", now=32.0, retryable=False)
    assert final.state is jobs.JobState.FAILED and final.error == "hostile image"
