"""builderd: the build pipeline, a persistent build queue with workers, and the build cache.

Pipeline (:func:`build_rootfs`): resolve the image -> apply its layers into a scratch tree ->
launch spec from the image config + app.yaml overrides -> harden -> inject ``/.vminit`` ->
reproducible ``rootfs.ext4`` -> zstd. Each step logs a line (the deploy turns them into progress
events) and checks for cancellation.

Progress: besides its log lines a build reports structured :class:`~.api.BuildProgress` (bytes of
each layer as it is pulled, verified and applied; the rootfs steps), at most one record per item
every :data:`PROGRESS_INTERVAL_S` plus each item's final 100 % (:class:`ProgressThrottle`). The
records go in ``build_logs`` next to the lines (``progress`` column), so ``wait`` hands both to
the deploy in the order they were written.

Queue: the generic job queue (:mod:`unkey_deploy.store.jobs`, kind ``build``) gives priorities,
leases, retries and crash recovery; the ``builds`` table holds the build record and
``build_logs`` its log lines. A build's state is its job's state. A worker that dies mid-build
stops heart-beating, :func:`jobs.requeue_expired` (run by every worker's loop) puts the job back
and another worker starts it again from scratch (its scratch directory is per attempt).

Cache: key = manifest digest + build options + pipeline version
(:meth:`BuildOptions.cache_key`). After resolving the image (one manifest request, with the
requester's own registry credentials: access is proven), a worker asks assetmanagerd for a live
asset built under that key; if there is one, the build succeeds at once with ``cached=True``.
A hit on another customer's asset never hands out that asset: the requester gets an asset record
of their own over the same content-addressed blob, and nothing of the other customer's (asset,
build, image reference) appears in the log, the events or the build record.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, Float, Integer, String, Text, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from ..assets.api import Asset, AssetMeta, Assets
from ..core import errors, metrics
from ..core import log as corelog
from ..core.clock import Clock, SystemClock
from ..core.config import BuilderConfig, Settings
from ..core.errors import (
    BuildFailed,
    DeadlineExceeded,
    IllegalTransition,
    ImageError,
    NotFound,
    ResourceExhausted,
    UnkeyError,
)
from ..core.ids import AssetId, BuildId, CustomerId, new_build_id
from ..store import jobs
from ..store.db import Base, transaction
from .api import (
    FINISHED,
    LOCAL_SOURCES,
    Build,
    BuildOptions,
    BuildProgress,
    BuildRequest,
    BuildState,
    ImageSource,
    Log,
    OnProgress,
    SourceImage,
)
from .harden import harden
from .rootfs import compress, make_rootfs
from .vminit import ImageConfig, inject, launch_spec

JOB_KIND = "build"
_log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25
"""At most one progress record per item this often (plus the final one): a 100 MB layer on a
fast network is ~100 chunks a second, which must not become 100 rows and events a second."""

ROOTFS_ITEM = "rootfs"
ROOTFS_STEPS = ("hardening", "mkfs.ext4 + e2fsck", "zstd", "done")


class ProgressThrottle:
    """Pass on a ``bytes`` item's progress at most every ``interval_s`` (its first and final
    records always), never a ``done`` below one already passed on, nothing after the final one.
    ``steps`` items pass every new step: there are a handful, and each one is news."""

    def __init__(
        self,
        emit: OnProgress,
        interval_s: float = PROGRESS_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._interval = interval_s
        self._now = monotonic
        self._last: dict[str, tuple[float, int]] = {}
        self._finished: set[str] = set()

    def __call__(self, p: BuildProgress) -> None:
        if p.item in self._finished:
            return
        now = self._now()
        last = self._last.get(p.item)
        if last is not None:
            if p.done <= last[1]:
                return  # back, or nothing new (a step already reported, a stalled layer)
            if p.unit == "bytes" and not p.finished and now - last[0] < self._interval:
                return
        self._last[p.item] = (now, p.done)
        if p.finished:
            self._finished.add(p.item)
        self._emit(p)


class Cancelled(Exception):
    """The build's cancellation was requested; raised at the next step boundary."""


# -- pipeline -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalBuild:
    """The output of one pipeline run (before it is registered as an asset)."""

    source: SourceImage
    cache_key: str
    rootfs: Path  # ext4
    compressed: Path  # ext4.zst
    tree_bytes: int
    ext4_bytes: int
    ext4_sha256: str
    compressed_bytes: int
    compressed_sha256: str
    harden_report: dict[str, Any]
    launch: dict[str, Any]
    seconds: float

    def metadata(self) -> dict[str, Any]:
        return {
            "source_image": self.source.ref,
            "manifest_digest": self.source.manifest_digest,
            "cache_key": self.cache_key,
            "rootfs": str(self.rootfs),
            "compressed": str(self.compressed),
            "tree_bytes": self.tree_bytes,
            "ext4_bytes": self.ext4_bytes,
            "ext4_sha256": self.ext4_sha256,
            "compressed_bytes": self.compressed_bytes,
            "compressed_sha256": self.compressed_sha256,
            "harden": self.harden_report,
            "launch": self.launch,
            "image_config": self.source.raw_config,
            "seconds": round(self.seconds, 3),
        }


def build_rootfs(
    source: ImageSource,
    image: str | SourceImage,
    options: BuildOptions,
    workdir: Path,
    *,
    init_binary: Path,
    config: BuilderConfig,
    log: Log,
    check_cancel: Callable[[], None] = lambda: None,
    keep_tree: bool = False,
    progress: OnProgress | None = None,
) -> LocalBuild:
    """Run the pipeline in ``workdir`` (created): ``rootfs.ext4`` and ``rootfs.ext4.zst``.

    ``progress`` gets every layer's bytes and the rootfs steps (:data:`ROOTFS_STEPS`: the step
    functions report no finer progress, so the rootfs counts whole steps), unthrottled. Each run
    (a retried attempt is a new run) reports every item from its start again."""
    report_progress = progress or (lambda _p: None)

    def step(done: int) -> None:
        total = len(ROOTFS_STEPS) - 1
        report_progress(BuildProgress(ROOTFS_ITEM, done, total, "steps", ROOTFS_STEPS[done]))

    start = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = image if isinstance(image, SourceImage) else source.resolve(image, log)
    key = options.cache_key(resolved.manifest_digest, init_digest(init_binary))
    root = workdir / "root"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(mode=0o755)
    try:
        check_cancel()
        log(f"extract: applying layers of {resolved.ref} ({resolved.manifest_digest})")
        source.extract(resolved, root, log, progress=progress)
        check_cancel()
        step(0)
        spec = launch_spec(root, resolved.config, options.overrides())
        log(f"launch: argv={list(spec.argv)} cwd={spec.cwd} user={spec.uid}:{spec.gid}")
        report = harden(root, spec, keep_shell=options.keep_shell, log=log)
        inject(root, spec, init_binary)
        check_cancel()
        step(1)
        log("rootfs: mkfs.ext4 -d (reproducible), e2fsck -fn")
        info = make_rootfs(root, workdir / "rootfs.ext4", seed=key)
        step(2)
        if not keep_tree:
            _discard_tree(root)  # unlinking ~1k files takes ~1 s: overlap it with zstd
        check_cancel()
        threads = max(1, min(4, os.cpu_count() or 1))
        z = compress(Path(info.path), workdir / "rootfs.ext4.zst", level=config.zstd_level,
                     threads=threads)  # fmt: skip
        log(f"compress: zstd -{config.zstd_level}: {info.bytes / 1e6:.1f} MB -> "
            f"{z.bytes / 1e6:.1f} MB")  # fmt: skip
        step(3)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # what mkfs running out of space says too (rootfs._run)
        raise ResourceExhausted(
            f"build work directory {workdir}: {exc.strerror}",
            suggestion="free space there (or give builderd a larger work directory), then retry",
        ) from exc
    finally:
        if not keep_tree:
            shutil.rmtree(root, ignore_errors=True)
    return LocalBuild(
        source=resolved,
        cache_key=key,
        rootfs=Path(info.path),
        compressed=Path(z.path),
        tree_bytes=info.tree_bytes,
        ext4_bytes=info.bytes,
        ext4_sha256=info.sha256,
        compressed_bytes=z.bytes,
        compressed_sha256=z.sha256,
        harden_report=report.as_dict(),
        launch=spec.as_dict(),
        seconds=time.monotonic() - start,
    )


@functools.lru_cache(maxsize=8)
def _init_digest(path: Path, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def init_digest(init_binary: Path) -> str:
    """sha256 of the init binary (part of the cache key); cached per path + mtime + size."""
    st = init_binary.stat()
    return _init_digest(init_binary, st.st_mtime_ns, st.st_size)


def _discard_tree(root: Path) -> None:
    """Move ``root`` aside (same directory, one rename) and delete it on a background thread.

    The caller's own cleanup of the work directory may race the thread; both ignore entries the
    other already removed, so the directory ends up gone either way.
    """
    trash = root.with_name(f".trash-{root.name}-{time.monotonic_ns()}")
    try:
        root.rename(trash)
    except OSError:
        shutil.rmtree(root, ignore_errors=True)
        return
    threading.Thread(
        target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, daemon=True,
        name="builder-discard-tree",
    ).start()  # fmt: skip


# -- records --------------------------------------------------------------------------------------


class BuildRow(Base):
    __tablename__ = "builds"

    build_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    image: Mapped[str] = mapped_column(String(1024))
    customer_id: Mapped[str] = mapped_column(String(40), index=True)
    deployment_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    options: Mapped[str] = mapped_column(Text)
    manifest_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    asset_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class BuildLogRow(Base):
    __tablename__ = "build_logs"

    build_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    line: Mapped[str] = mapped_column(Text)
    # BuildProgress.as_dict() as JSON for a progress record (``line`` is its rendering)
    progress: Mapped[str | None] = mapped_column(Text, nullable=True)


_JOB_TO_BUILD = {
    jobs.JobState.QUEUED: BuildState.QUEUED,
    jobs.JobState.RUNNING: BuildState.RUNNING,
    jobs.JobState.SUCCEEDED: BuildState.SUCCEEDED,
    jobs.JobState.FAILED: BuildState.FAILED,
    jobs.JobState.CANCELLED: BuildState.CANCELLED,
}


class BuildService:
    """The ``Builder`` implementation plus its workers."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        assets: Assets,
        source: ImageSource,
        *,
        work_dir: Path,
        init_binary: Path,
        config: BuilderConfig | None = None,
        clock: Clock | None = None,
        lease_s: float = 30.0,
        poll_s: float = 0.2,
        max_attempts: int = 3,
    ) -> None:
        self.factory = factory
        self.assets = assets
        self.source = source
        self.work_dir = Path(work_dir)
        self.init_binary = init_binary
        self.config = config or BuilderConfig()
        self.clock = clock or SystemClock()
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.max_attempts = max_attempts
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _now(self) -> float:
        return self.clock.time_ns() / 1e9

    # -- Builder ----------------------------------------------------------------------------------
    def submit(self, req: BuildRequest) -> BuildId:
        if not req.image or len(req.image) > 1024:
            raise errors.InvalidInput("image reference must be 1-1024 characters")
        build_id = new_build_id()
        now = self._now()
        with transaction(self.factory) as s:
            payload = {"build_id": build_id, "log": _log_context()}
            job = jobs.enqueue(s, JOB_KIND, payload, now=now,
                               priority=req.priority, max_attempts=self.max_attempts)  # fmt: skip
            s.add(BuildRow(
                build_id=build_id, job_id=job.id, image=req.image, customer_id=req.customer_id,
                deployment_id=req.deployment_id, options=json.dumps(req.options.as_dict()),
                cached=False, created_at=now, updated_at=now,
            ))  # fmt: skip
            s.add(BuildLogRow(build_id=build_id, seq=0, ts=now, line=f"queued: {req.image}"))
        self._wake.set()
        return build_id

    def _build(self, s: Session, build_id: str, *, with_log: bool = True) -> Build:
        row = s.get(BuildRow, build_id)
        if row is None:
            raise NotFound(f"build {build_id} not found")
        job = jobs.get(s, row.job_id)
        if job.state in jobs.FINISHED:
            # Statements outside one snapshot (SQLite's driver, PostgreSQL read committed): the
            # row was read before the job; the commit that finished the job also wrote the row.
            s.refresh(row)
        lines = (
            s.scalars(
                select(BuildLogRow.line)
                .where(BuildLogRow.build_id == build_id, BuildLogRow.progress.is_(None))
                .order_by(BuildLogRow.seq)
            ).all()
            if with_log
            else ()
        )
        error = json.loads(row.error) if row.error else None
        if error is None and job.state in (jobs.JobState.FAILED,) and job.error:
            error = {"code": "build_failed", "message": job.error}
        return Build(
            build_id=BuildId(row.build_id),
            state=_JOB_TO_BUILD[job.state],
            image=row.image,
            customer_id=CustomerId(row.customer_id),
            deployment_id=row.deployment_id,
            asset_id=AssetId(row.asset_id) if row.asset_id else None,
            manifest_digest=row.manifest_digest,
            cached=row.cached,
            error=error,
            attempts=job.attempts,
            log=tuple(lines),
            created_at=row.created_at,
            updated_at=max(row.updated_at, job.updated_at),
        )

    def get(self, build_id: BuildId) -> Build:
        with self.factory() as s:
            return self._build(s, build_id)

    def wait(
        self,
        build_id: BuildId,
        timeout: float,
        on_log: Log | None = None,
        on_progress: OnProgress | None = None,
    ) -> Build:
        deadline = time.monotonic() + timeout
        seq = -1
        while True:
            with self.factory() as s:
                # state first: every record written before the build finished is then visible
                b = self._build(s, build_id, with_log=False)
                rows = s.execute(
                    select(BuildLogRow.seq, BuildLogRow.line, BuildLogRow.progress)
                    .where(BuildLogRow.build_id == build_id, BuildLogRow.seq > seq)
                    .order_by(BuildLogRow.seq)
                ).all()
            for row_seq, line, prog in rows:
                seq = row_seq
                if prog is None:
                    if on_log is not None:
                        on_log(line)
                elif on_progress is not None:
                    on_progress(BuildProgress.from_dict(json.loads(prog)))
            if b.state in FINISHED:
                return self.get(build_id)
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"build {build_id} not finished after {timeout:.0f} s "
                                       f"(state {b.state})")  # fmt: skip
            time.sleep(0.05)

    def cancel(self, build_id: BuildId) -> Build:
        with transaction(self.factory) as s:
            row = s.get(BuildRow, build_id)
            if row is None:
                raise NotFound(f"build {build_id} not found")
            try:
                jobs.cancel(s, row.job_id, now=self._now())
            except IllegalTransition as exc:
                raise IllegalTransition(
                    f"build {build_id} already finished; nothing to cancel"
                ) from exc
        self.log_line(build_id, "cancel requested")
        return self.get(build_id)

    # -- workers ----------------------------------------------------------------------------------
    def _log(
        self, s: Session, build_id: str, line: str, progress: BuildProgress | None = None
    ) -> None:
        last = s.scalars(
            select(BuildLogRow.seq).where(BuildLogRow.build_id == build_id)
            .order_by(BuildLogRow.seq.desc()).limit(1)
        ).first()  # fmt: skip
        data = json.dumps(progress.as_dict()) if progress is not None else None
        s.add(BuildLogRow(build_id=build_id, seq=(last if last is not None else -1) + 1,
                          ts=self._now(), line=line[:4000], progress=data))  # fmt: skip

    def log_line(self, build_id: str, line: str, progress: BuildProgress | None = None) -> None:
        """Append a log line, or with ``progress`` a progress record (``line`` renders it)."""
        for attempt in range(5):
            try:
                with transaction(self.factory) as s:
                    self._log(s, build_id, line, progress)
                return
            except IntegrityError:  # another writer took that seq (e.g. cancel vs worker)
                if attempt == 4:
                    raise

    def start(self, n: int | None = None) -> None:
        """Start ``n`` worker threads (default ``BuilderConfig.workers``), after removing the
        scratch that workers of this host killed before left behind (:meth:`_sweep`)."""
        try:
            for d in sorted(self.work_dir.iterdir()) if self.work_dir.is_dir() else ():
                with self.factory() as s:
                    row = s.get(BuildRow, d.name)
                    job = s.get(jobs.JobRow, row.job_id) if row is not None else None
                    snapshot = jobs.Job.of(job) if job is not None else None
                if snapshot is not None:
                    self._sweep(d.name, snapshot)
        except Exception:  # a database hiccup must not keep the workers from starting
            _log.exception("builder: sweeping %s failed; continuing", self.work_dir)
        host = socket.gethostname()
        for i in range(n or self.config.workers):
            name = f"builder-{host}-{os.getpid()}-{i}"
            t = threading.Thread(target=self.run_worker, args=(name,), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def run_worker(self, name: str, *, once: bool = False) -> None:
        """Claim and run builds until :meth:`stop` (or one pass with ``once``)."""
        while not self._stop.is_set():
            try:
                with transaction(self.factory) as s:
                    dead = jobs.requeue_expired(s, now=self._now(), kinds=[JOB_KIND])
                for j in dead:  # their workers died: what they left here goes
                    self._sweep(str(j.payload.get("build_id", "")), j)
                job = jobs.claim(self.factory, [JOB_KIND], name, now=self._now(),
                                 lease_s=self.lease_s)  # fmt: skip
                if job is not None:
                    self._run_job(job, name)
            except Exception:
                # A worker thread must outlive a database hiccup (SQLite "database is locked",
                # a PostgreSQL failover) or a bug in one build: dying here would silently stop
                # builderd. The job in hand, if any, keeps its lease until it expires and is then
                # retried by requeue_expired.
                _log.exception("builder worker %s: error in the worker loop; continuing", name)
                if once:
                    raise
                self._stop.wait(max(self.poll_s, 0.5))
                continue
            if once:
                return
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    @contextlib.contextmanager
    def _heartbeat(
        self, job: jobs.Job, worker: str, cancel: threading.Event, lost: threading.Event
    ) -> Iterator[None]:
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    with transaction(self.factory) as s:
                        j = jobs.heartbeat(s, job.id, worker, now=self._now(), lease_s=self.lease_s)
                    if j.cancel_requested:
                        cancel.set()
                except UnkeyError:  # lost the lease (e.g. stalled past it): stop the build
                    lost.set()
                    cancel.set()
                    return
                except Exception:  # a database hiccup: beat again next time (if the lease
                    # ran out meanwhile, that beat finds the job gone and stops the build)
                    _log.warning("builder %s: heartbeat failed; retrying", worker, exc_info=True)

        t = threading.Thread(target=beat, daemon=True, name=f"{worker}-heartbeat")
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()

    def _run_job(self, job: jobs.Job, worker: str) -> None:
        build_id = str(job.payload.get("build_id", ""))
        with self.factory() as s:
            row = s.get(BuildRow, build_id)
            if row is None:  # a malformed queue message must not kill the worker
                with transaction(self.factory) as s2:
                    jobs.fail(s2, job.id, worker, f"no build record {build_id!r}",
                              now=self._now(), retryable=False)  # fmt: skip
                return
            image, customer, opts_raw = row.image, row.customer_id, row.options
            deployment_id = row.deployment_id
        # the submitter's log context (request_id, deployment_id) travels in the job payload, so
        # one deploy can be followed from gatewayd through the deployer into builderd
        submitted = job.payload.get("log")
        fields = dict(submitted) if isinstance(submitted, dict) else {}
        fields.update(build_id=build_id, customer_id=customer)
        if deployment_id:
            fields["deployment_id"] = deployment_id
        with corelog.bound(**fields):
            corelog.event(_log, "build started", attempt=job.attempts, image=image, worker=worker)
            metrics.BUILDS_STARTED.inc()
            t0 = time.monotonic()
            outcome = self._attempt(
                job, worker, build_id, image=image, customer=customer, opts_raw=opts_raw
            )
            seconds = time.monotonic() - t0
            metrics.BUILDS_FINISHED.labels(outcome).inc()
            if outcome in ("succeeded", "cached"):
                metrics.BUILD_SECONDS.observe(seconds)
            corelog.event(_log, f"build {outcome}", seconds=round(seconds, 3))

    def _attempt(
        self, job: jobs.Job, worker: str, build_id: str, *, image: str, customer: str, opts_raw: str
    ) -> str:
        """Run one attempt of a build; returns its outcome (succeeded, cached, cancelled, ...)."""
        cancel = threading.Event()
        lost = threading.Event()  # the heartbeat found the job is no longer ours
        scratch = self.work_dir / build_id / f"attempt-{job.attempts}"

        def log(line: str) -> None:
            self.log_line(build_id, line)
            check_cancel()

        deadline = time.monotonic() + self.config.max_build_s

        def check_cancel() -> None:
            if cancel.is_set():
                raise Cancelled
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"the build took longer than builder.max_build_s "
                    f"({self.config.max_build_s:g} s)",
                    retryable=False,
                )

        def record_progress(p: BuildProgress) -> None:
            self.log_line(build_id, p.render(), p)

        def progress(p: BuildProgress) -> None:
            throttle(p)
            check_cancel()  # a layer streaming for minutes must still notice a cancel

        throttle = ProgressThrottle(record_progress)

        try:
            with self._heartbeat(job, worker, cancel, lost):
                log(f"attempt {job.attempts}/{job.max_attempts} on {worker}")
                options = BuildOptions.from_dict(json.loads(opts_raw))
                resolved = self.source.resolve(image, log)
                key = options.cache_key(resolved.manifest_digest, init_digest(self.init_binary))
                self._set(build_id, manifest_digest=resolved.manifest_digest)
                hit = self._cached(key, customer, build_id, image)
                if hit is not None:
                    self.source.release(resolved)
                    log(f"cache hit: {hit.asset_id}, a rootfs built before from "
                        f"{resolved.manifest_digest} with the same options")  # fmt: skip
                    self._finish(job, worker, build_id, hit, cached=True)
                    return "cached"
                out = build_rootfs(self.source, resolved, options, scratch,
                                   init_binary=self.init_binary, config=self.config, log=log,
                                   check_cancel=check_cancel, progress=progress)  # fmt: skip
                check_cancel()
                asset = self.assets.register(out.compressed, AssetMeta(
                    customer_id=CustomerId(customer), source_image=image,
                    manifest_digest=resolved.manifest_digest, build_id=BuildId(build_id),
                    build_key=key, tree_bytes=out.tree_bytes, ext4_bytes=out.ext4_bytes,
                    ext4_sha256=out.ext4_sha256,
                    image_config={"config": resolved.raw_config, "launch": out.launch,
                                  "harden": out.harden_report},
                ))  # fmt: skip
                log(f"asset ready: {asset.asset_id} ({asset.compressed_bytes / 1e6:.1f} MB "
                    f"compressed, {out.seconds:.1f} s)")  # fmt: skip
                self._finish(job, worker, build_id, asset, cached=False)
                return "succeeded"
        except Cancelled:
            if lost.is_set():
                return self._abandoned(job, worker, build_id)
            # clean up before the state says cancelled: whoever waits may look right away
            self._remove_scratch(build_id, job.attempts)
            with transaction(self.factory) as s:
                self._log(s, build_id, "cancelled")
                jobs.acknowledge_cancel(s, job.id, worker, now=self._now())
            return "cancelled"
        except UnkeyError as exc:
            return self._failed(job, worker, build_id, exc)
        except Exception as exc:
            return self._failed(job, worker, build_id, UnkeyError(f"internal error: {exc!r}",
                                                                 retryable=True))  # fmt: skip
        finally:
            self._remove_scratch(build_id, job.attempts)

    def _remove_scratch(self, build_id: str, attempt: int) -> None:
        """Remove this attempt's scratch directory and any earlier attempt's (left by a worker
        that crashed), then the build's directory once empty. Never a later attempt's: when
        this worker lost its lease, another one may be running the next attempt right now."""
        build_dir = self.work_dir / build_id
        with contextlib.suppress(FileNotFoundError):
            for d in build_dir.iterdir():
                n = d.name.removeprefix("attempt-")
                if not (n.isdigit() and int(n) > attempt):
                    shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: a later attempt is running
            build_dir.rmdir()

    def _sweep(self, build_id: str, job: jobs.Job) -> None:
        """Remove the scratch of ``build_id``'s dead attempts: all of it once the build is
        finished, else that of the attempts before the one that may be running (a running
        job's own attempt may be another live worker's here)."""
        if not build_id or "/" in build_id or build_id in (".", ".."):
            return
        if job.state in jobs.FINISHED:
            shutil.rmtree(self.work_dir / build_id, ignore_errors=True)
        else:
            last = job.attempts if job.state == jobs.JobState.QUEUED else job.attempts - 1
            self._remove_scratch(build_id, last)

    def _abandoned(self, job: jobs.Job, worker: str, build_id: str) -> str:
        """This worker lost the job's lease (it stalled past it): the queue gave the job to
        another attempt or finished it, so nothing of the job is this worker's to change."""
        self.log_line(build_id, f"attempt {job.attempts} on {worker} lost its lease; stopped")
        corelog.event(_log, "build attempt abandoned: lease lost", logging.WARNING,
                      attempt=job.attempts, worker=worker)  # fmt: skip
        return "abandoned"

    def _cached(self, key: str, customer: str, build_id: str, image: str) -> Asset | None:
        """The requester's own live asset built under ``key``, if any; else, when another
        customer's exists, a new asset record of the requester's over the same blob (the bytes
        are equal by the key's construction; the blob is stored once, content-addressed).

        The requester resolved the manifest with their own credentials before we get here, so
        they are entitled to the image's content; they are not entitled to know who else built it:
        the new record carries the requester's build id and image reference only.
        """
        own = [a for a in self.assets.list(CustomerId(customer)) if a.build_key == key]
        if own:
            return max(own, key=lambda a: a.created_at)
        other = self.assets.find(key)
        if other is None:
            return None
        try:
            path = self.assets.local_path(other.asset_id)
        except NotFound:  # retired since find(): build it instead
            return None
        return self.assets.register(path, AssetMeta(
            customer_id=CustomerId(customer), source_image=image,
            manifest_digest=other.manifest_digest, build_id=BuildId(build_id), build_key=key,
            tree_bytes=other.tree_bytes, ext4_bytes=other.ext4_bytes,
            ext4_sha256=other.ext4_sha256, image_config=other.image_config,
        ))  # fmt: skip

    def _set(self, build_id: str, **fields: Any) -> None:
        with transaction(self.factory) as s:
            row = s.get(BuildRow, build_id)
            if row is not None:
                for k, v in fields.items():
                    setattr(row, k, v)
                row.updated_at = self._now()

    def _finish(
        self, job: jobs.Job, worker: str, build_id: str, asset: Asset, *, cached: bool
    ) -> None:
        with transaction(self.factory) as s:
            row = s.get(BuildRow, build_id)
            assert row is not None  # noqa: S101 (checked by the caller in this attempt)
            row.asset_id, row.cached, row.error, row.updated_at = (
                asset.asset_id,
                cached,
                None,
                self._now(),
            )
            jobs.complete(s, job.id, worker, now=self._now(),
                          result={"asset_id": asset.asset_id, "cached": cached})  # fmt: skip

    def _failed(self, job: jobs.Job, worker: str, build_id: str, exc: UnkeyError) -> str:
        try:
            with transaction(self.factory) as s:
                after = jobs.fail(s, job.id, worker, exc.message, now=self._now(),
                                  retryable=exc.retryable, backoff_s=1.0)  # fmt: skip
                retrying = after.state == jobs.JobState.QUEUED
                self._log(s, build_id, f"{'error (will retry)' if retrying else 'failed'}: "
                                       f"{exc.code}: {exc.message}")  # fmt: skip
                row = s.get(BuildRow, build_id)
                if row is not None and not retrying:
                    row.error = json.dumps(exc.to_dict())
                    row.updated_at = self._now()
        except IllegalTransition:  # the job is no longer ours: its lease ran out meanwhile
            return self._abandoned(job, worker, build_id)
        corelog.event(_log, "build attempt failed", logging.WARNING, error=exc.code,
                      message=exc.message, retrying=retrying)  # fmt: skip
        return "retrying" if retrying else "failed"


def _log_context() -> dict[str, str]:
    """The ids of the submitter's log context worth carrying to the worker (JSON-safe)."""
    keep = ("request_id", "customer_id", "deployment_id")
    return {k: str(v) for k, v in corelog.current().items() if k in keep and v is not None}


# -- deploy workflow adapter ----------------------------------------------------------------------


class DeployBuilds:
    """``deployer.api.Builds`` on top of builderd: submit, stream the log as progress events,
    wait, and raise the build's own error (BuildFailed/ImageError/LayerError...) on failure."""

    def __init__(self, builder: BuildService, *, timeout_s: float = 1800.0) -> None:
        self.builder = builder
        self.timeout_s = timeout_s

    def build(self, req: Any, progress: Callable[..., None], /) -> Any:
        from ..deployer.api import BuiltAsset  # noqa: PLC0415 (deployer depends on us, not back)

        # app.yaml's command/args are baked into /.vminit/argv (env is applied by metald at
        # launch, so one asset serves deployments that differ only in env).
        options = BuildOptions(
            keep_shell=bool(req.keep_shell),
            command=tuple(req.command) if req.command else None,
            args=tuple(req.args) if getattr(req, "args", None) is not None else None,
        )
        build_id = self.builder.submit(BuildRequest(
            image=req.image, customer_id=CustomerId(req.customer_id), options=options,
            priority=10, deployment_id=req.deployment_id,
        ))  # fmt: skip
        corelog.event(_log, "build queued", build_id=build_id, image=req.image)
        progress("build", f"build {build_id} queued", build_id=build_id)

        def on_log(line: str) -> None:
            progress("build", line, build_id=build_id)

        def on_progress(p: BuildProgress) -> None:
            progress("build", p.render(), build_id=build_id, progress=p.as_dict())

        try:
            b = self.builder.wait(build_id, self.timeout_s, on_log=on_log,
                                  on_progress=on_progress)  # fmt: skip
        except DeadlineExceeded:
            # the build is this deploy's alone: nobody waits for it any more, so it must not
            # hold a worker on (and a retried deploy submits a new one)
            with contextlib.suppress(UnkeyError):  # finished meanwhile
                self.builder.cancel(build_id)
            raise
        if b.state != BuildState.SUCCEEDED or b.asset_id is None:
            if b.error:
                raise errors.from_dict(b.error)
            raise BuildFailed(f"build {build_id} {b.state}")
        asset = self.builder.assets.get(b.asset_id)
        return BuiltAsset(asset_id=asset.asset_id, build_id=build_id,
                          rootfs_bytes=asset.ext4_bytes, cached=b.cached)  # fmt: skip


# -- wiring ---------------------------------------------------------------------------------------


class OciImageSource:
    """``ImageSource`` over :mod:`.source` (registry refs, ``oci:PATH[:tag]``,
    ``docker-archive:PATH``) and :mod:`.layers` (the safe layer applier)."""

    def __init__(
        self,
        config: BuilderConfig | None = None,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        *,
        local_sources: bool | None = None,
    ) -> None:
        self.config = config or BuilderConfig()
        self.credentials = credentials
        # images from this host's file system (default: builder.local_sources)
        self.local_sources = self.config.local_sources if local_sources is None else local_sources

    def resolve(self, image: str, log: Log) -> SourceImage:
        from . import source  # noqa: PLC0415

        if not self.local_sources and image.startswith(LOCAL_SOURCES):
            raise ImageError(
                f"image {image[:200]!r}: images from the builder's own file system "
                f"({', '.join(LOCAL_SOURCES)}) are not built here (builder.local_sources is off)",
                suggestion="push the image to a registry and deploy its reference",
            )
        log(f"resolve: {image}")
        img = source.resolve(image, config=self.config, credentials=self.credentials)
        try:
            cfg = ImageConfig.from_oci(img.image_config)
        except BaseException:
            img.close()
            raise
        log(f"resolve: {img.manifest_digest}, {len(img.layers)} layers, "
            f"{img.compressed_size / 1e6:.1f} MB")  # fmt: skip
        return SourceImage(image, img.manifest_digest, cfg, img.image_config, handle=img)

    def extract(
        self, image: SourceImage, root: Path, log: Log, /, progress: OnProgress | None = None
    ) -> None:
        from .layers import extract_image  # noqa: PLC0415
        from .oci import short_digest  # noqa: PLC0415

        def layer_progress(i: int, done: int, total: int) -> None:
            if progress is not None:
                layers = image.handle.layers
                item = f"layer {i + 1}/{len(layers)} {short_digest(layers[i].digest)}"
                progress(BuildProgress(item, done, total, "bytes"))

        try:
            stats = extract_image(image.handle, root, self.config, log, progress=layer_progress)
            log(f"extract: {len(stats.layers)} layers, {stats.entries} entries, "
                f"{stats.tar_bytes / 1e6:.1f} MB uncompressed")  # fmt: skip
        finally:
            self.release(image)

    def release(self, image: SourceImage) -> None:
        if image.handle is not None:
            image.handle.close()


def oci_source(settings: Settings) -> ImageSource:
    """The real image source (registry / oci: / docker-archive:)."""
    return OciImageSource(settings.builder)


def open_builder(settings: Settings, *, source: ImageSource | None = None,
                 clock: Clock | None = None, lease_s: float = 30.0) -> BuildService:  # fmt: skip
    """builderd for ``settings``: control-plane DB, asset manager, init built under data_dir."""
    from ..assets.service import open_assets  # noqa: PLC0415
    from ..store.db import make_engine, session_factory  # noqa: PLC0415
    from .vminit import build_init  # noqa: PLC0415

    engine = make_engine(settings.resolved_database_url)
    return BuildService(
        session_factory(engine), open_assets(settings, clock=clock),
        source or oci_source(settings), work_dir=settings.data_dir / "builds",
        init_binary=build_init(settings.native_dir), config=settings.builder,
        clock=clock, lease_s=lease_s,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m unkey_deploy.builder.service``: run builderd's workers until SIGTERM."""
    import signal  # noqa: PLC0415

    from ..core.config import load  # noqa: PLC0415
    from ..store.db import make_engine, upgrade  # noqa: PLC0415

    settings = load(environ=os.environ)
    corelog.configure("builderd", settings.log_level)
    metrics.serve(settings.metrics.builderd, metrics.BUILDER)
    upgrade(make_engine(settings.resolved_database_url))
    svc = open_builder(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    svc.start()
    print(f"builderd: {settings.builder.workers} workers", file=sys.stderr, flush=True)
    stop.wait()
    svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
