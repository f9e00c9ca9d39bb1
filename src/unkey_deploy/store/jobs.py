"""A generic persistent job queue on the control-plane database (SQLite or PostgreSQL).

Used by every service that hands work to another (the gateway's route decision, builderd's build
queue, metald's VM work). Properties:

- **priority**: higher first, then oldest first;
- **dedupe**: ``(kind, dedupe_key)`` is unique while a job is not finished, so the same request
  enqueued twice yields the same job;
- **leases**: a claimed job belongs to one worker until ``lease_until``; workers heartbeat, and
  a job whose worker died (lease expired) is re-queued by :func:`requeue_expired`, so a crash
  never loses work; ``attempts`` counts claims and ``max_attempts`` bounds retries;
- **cancel**: a queued job is cancelled at once, a running one gets ``cancel_requested`` which its
  worker sees on its next heartbeat.

Claims use an optimistic ``UPDATE ... WHERE state='queued'`` so concurrent workers (threads or
processes, on either database) never claim the same job.

Lifecycle (a named error for every illegal action)::

    queued --claim--> running --complete--> succeeded
      |                 |  \\--fail(retry)--> queued
      |                 |   \\-fail(final)--> failed
      \\--cancel--> cancelled <--(worker sees cancel_requested)--/
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Boolean, Float, Index, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from ..core.errors import IllegalTransition, NotFound
from ..core.ids import new_id
from .db import Base


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "kind", "state", "priority", "created_at"),
        Index("ix_jobs_dedupe", "kind", "dedupe_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    dedupe_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))
    payload: Mapped[str] = mapped_column(Text)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class Job:
    """A snapshot of one job."""

    id: str
    kind: str
    state: JobState
    priority: int
    payload: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_until: float | None
    cancel_requested: bool
    dedupe_key: str | None
    created_at: float
    updated_at: float
    not_before: float = 0.0  # a re-queued job is not claimed before this (its retry backoff)

    @classmethod
    def of(cls, row: JobRow) -> Job:
        return cls(
            id=row.id,
            kind=row.kind,
            state=JobState(row.state),
            priority=row.priority,
            payload=json.loads(row.payload),
            result=json.loads(row.result) if row.result else None,
            error=row.error,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            lease_owner=row.lease_owner,
            lease_until=row.lease_until,
            cancel_requested=row.cancel_requested,
            dedupe_key=row.dedupe_key,
            created_at=row.created_at,
            updated_at=row.updated_at,
            not_before=row.not_before,
        )


def enqueue(
    session: Session,
    kind: str,
    payload: dict[str, Any],
    *,
    now: float,
    priority: int = 0,
    dedupe_key: str | None = None,
    max_attempts: int = 3,
    not_before: float = 0.0,
) -> Job:
    """Add a job; with ``dedupe_key``, return the unfinished job already queued under it."""
    if dedupe_key is not None:
        existing = session.scalars(
            select(JobRow).where(
                JobRow.kind == kind,
                JobRow.dedupe_key == dedupe_key,
                JobRow.state.in_([JobState.QUEUED, JobState.RUNNING]),
            )
        ).first()
        if existing is not None:
            return Job.of(existing)
    row = JobRow(
        id=new_id("job"),
        kind=kind,
        dedupe_key=dedupe_key,
        priority=priority,
        state=JobState.QUEUED,
        payload=json.dumps(payload, sort_keys=True),
        attempts=0,
        max_attempts=max_attempts,
        not_before=not_before,
        cancel_requested=False,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return Job.of(row)


def claim(
    factory: sessionmaker[Session],
    kinds: Iterable[str],
    worker: str,
    *,
    now: float,
    lease_s: float = 30.0,
) -> Job | None:
    """Claim the most urgent queued job of ``kinds`` for ``worker``, or None if there is none."""
    kinds = list(kinds)
    for _ in range(8):
        with factory() as session, session.begin():
            candidates = session.scalars(
                select(JobRow.id)
                .where(
                    JobRow.kind.in_(kinds),
                    JobRow.state == JobState.QUEUED,
                    JobRow.not_before <= now,
                )
                .order_by(JobRow.priority.desc(), JobRow.created_at, JobRow.id)
                .limit(4)
            ).all()
            if not candidates:
                return None
            for job_id in candidates:
                res = session.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.state == JobState.QUEUED)
                    .values(
                        state=JobState.RUNNING,
                        lease_owner=worker,
                        lease_until=now + lease_s,
                        attempts=JobRow.attempts + 1,
                        updated_at=now,
                    )
                )
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    row = session.get(JobRow, job_id, populate_existing=True)
                    if row is not None:
                        return Job.of(row)
    return None


def _owned(session: Session, job_id: str, worker: str) -> JobRow:
    row = session.get(JobRow, job_id, with_for_update=True)
    if row is None:
        raise NotFound(f"job {job_id} not found")
    if row.state != JobState.RUNNING or row.lease_owner != worker:
        raise IllegalTransition(
            f"job {job_id} is {row.state} (owner {row.lease_owner}); {worker} no longer holds it"
        )
    return row


def heartbeat(session: Session, job_id: str, worker: str, *, now: float, lease_s: float) -> Job:
    """Extend the lease; the returned job's ``cancel_requested`` tells the worker to stop."""
    row = _owned(session, job_id, worker)
    row.lease_until = now + lease_s
    row.updated_at = now
    return Job.of(row)


def complete(
    session: Session, job_id: str, worker: str, *, now: float, result: dict[str, Any] | None = None
) -> Job:
    row = _owned(session, job_id, worker)
    row.state = JobState.SUCCEEDED
    row.result = json.dumps(result or {}, sort_keys=True)
    row.lease_owner = None
    row.lease_until = None
    row.updated_at = now
    return Job.of(row)


def fail(
    session: Session,
    job_id: str,
    worker: str,
    error: str,
    *,
    now: float,
    retryable: bool = True,
    backoff_s: float = 1.0,
) -> Job:
    """Record a failure; re-queue after ``backoff_s`` while attempts remain and it is retryable."""
    row = _owned(session, job_id, worker)
    row.error = error
    row.lease_owner = None
    row.lease_until = None
    row.updated_at = now
    if row.cancel_requested:
        row.state = JobState.CANCELLED
    elif retryable and row.attempts < row.max_attempts:
        row.state = JobState.QUEUED
        row.not_before = now + backoff_s * (2 ** max(row.attempts - 1, 0))
    else:
        row.state = JobState.FAILED
    return Job.of(row)


def acknowledge_cancel(session: Session, job_id: str, worker: str, *, now: float) -> Job:
    """The worker stopped because cancellation was requested."""
    row = _owned(session, job_id, worker)
    row.state = JobState.CANCELLED
    row.lease_owner = None
    row.lease_until = None
    row.updated_at = now
    return Job.of(row)


def cancel(session: Session, job_id: str, *, now: float) -> Job:
    """Cancel a queued job now, or ask the worker of a running one to stop."""
    row = session.get(JobRow, job_id, with_for_update=True)
    if row is None:
        raise NotFound(f"job {job_id} not found")
    if row.state in FINISHED:
        raise IllegalTransition(f"job {job_id} already {row.state}; nothing to cancel")
    if row.state == JobState.QUEUED:
        row.state = JobState.CANCELLED
    else:
        row.cancel_requested = True
    row.updated_at = now
    return Job.of(row)


def requeue_expired(
    session: Session, *, now: float, kinds: Iterable[str] | None = None
) -> list[Job]:
    """Jobs whose worker stopped heartbeating: back to the queue, or failed when out of attempts."""
    q = select(JobRow).where(JobRow.state == JobState.RUNNING, JobRow.lease_until < now)
    if kinds is not None:
        q = q.where(JobRow.kind.in_(list(kinds)))
    rows = session.scalars(q).all()
    out = []
    for row in rows:
        row.lease_owner = None
        row.lease_until = None
        row.updated_at = now
        if row.cancel_requested:
            row.state = JobState.CANCELLED
        elif row.attempts < row.max_attempts:
            row.state = JobState.QUEUED
            row.error = "worker lost its lease (crashed or stalled); retrying"
        else:
            row.state = JobState.FAILED
            row.error = f"worker lost its lease after {row.attempts} attempts"
        out.append(Job.of(row))
    return out


def get(session: Session, job_id: str) -> Job:
    row = session.get(JobRow, job_id)
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return Job.of(row)


def list_jobs(
    session: Session, kind: str | None = None, states: Iterable[JobState] | None = None
) -> list[Job]:
    q = select(JobRow).order_by(JobRow.created_at, JobRow.id)
    if kind is not None:
        q = q.where(JobRow.kind == kind)
    if states is not None:
        q = q.where(JobRow.state.in_(list(states)))
    return [Job.of(r) for r in session.scalars(q).all()]
