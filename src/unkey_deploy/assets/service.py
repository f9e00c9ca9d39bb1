"""assetmanagerd: the index (SQLAlchemy on the control-plane engine) over a blob store.

Invariants:
* a blob is stored once per content (sha256 of the compressed bytes) and referenced by any number
  of assets;
* an asset with a lease is never deleted, so its blob is never collected;
* ``gc`` deletes only blobs that no live asset references and that have been unreferenced for at
  least the grace period (young orphans, e.g. of a crashed register, are kept as well);
* a blob row is where ``register`` and ``gc`` serialize (on SQLite and PostgreSQL alike, with
  single conditional ``UPDATE``/``INSERT`` statements, no read-then-write): ``register`` first
  *claims* the row (``state='live'``, ``claimed_at=now``, ``unreferenced_since=NULL``; or inserts
  it), only then stores the blob and inserts the asset; ``gc`` deletes a blob only after it
  moved its row from ``live`` to ``deleting`` with an update whose condition says "not claimed
  within the grace, not referenced by a live or leased asset", and removes the row after the
  blob. A register finding the row ``deleting`` waits until it is gone and stores the blob
  again; a gc finding it claimed leaves it. So no registered asset ever loses its blob.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import zstandard
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CursorResult,
    Float,
    Index,
    String,
    and_,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Result
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from ..core.clock import Clock, SystemClock
from ..core.config import Settings
from ..core.errors import Conflict, InvalidInput, NotFound, UnkeyError
from ..core.ids import AssetId, BuildId, CustomerId, new_asset_id
from ..store.db import Base, make_engine, session_factory, transaction
from .api import Asset, AssetMeta, GcReport, Lease
from .blobs import BlobStore, open_blob_store, sha256_of

DEFAULT_GRACE_S = 3600.0
LIVE, DELETING = "live", "deleting"
# How long a register waits for a gc that is deleting the same blob (it takes one blob delete).
CLAIM_WAIT_S = 60.0


class AssetRow(Base):
    __tablename__ = "assets"
    __table_args__ = (
        Index("ix_assets_build_key", "build_key"),
        Index("ix_assets_customer", "customer_id"),
        Index("ix_assets_blob", "blob_sha256"),
    )

    asset_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    customer_id: Mapped[str] = mapped_column(String(40))
    source_image: Mapped[str] = mapped_column(String(1024))
    manifest_digest: Mapped[str] = mapped_column(String(80))
    build_id: Mapped[str] = mapped_column(String(40))
    build_key: Mapped[str] = mapped_column(String(255))
    tree_bytes: Mapped[int] = mapped_column(BigInteger)
    ext4_bytes: Mapped[int] = mapped_column(BigInteger)
    compressed_bytes: Mapped[int] = mapped_column(BigInteger)
    ext4_sha256: Mapped[str] = mapped_column(String(64))
    blob_sha256: Mapped[str] = mapped_column(String(64))
    image_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class AssetLeaseRow(Base):
    __tablename__ = "asset_leases"

    asset_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class AssetBlobRow(Base):
    __tablename__ = "asset_blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    # when the last live asset referencing it went away (None while referenced)
    unreferenced_since: Mapped[float | None] = mapped_column(Float, nullable=True)
    # LIVE, or DELETING from the moment gc decided to delete the blob until the row is removed
    state: Mapped[str] = mapped_column(String(16), default=LIVE, server_default=LIVE)
    # LIVE: when a register last claimed it (before storing the blob; None for rows made before
    # 0002). DELETING: when gc took it (a DELETING row older than the grace is a crashed gc's)
    claimed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


def _rowcount(result: Result[Any]) -> int:
    return int(cast("CursorResult[Any]", result).rowcount)  # UPDATE/DELETE results are cursors


def _asset(row: AssetRow) -> Asset:
    return Asset(
        asset_id=AssetId(row.asset_id),
        type="rootfs",
        customer_id=CustomerId(row.customer_id),
        source_image=row.source_image,
        manifest_digest=row.manifest_digest,
        build_id=BuildId(row.build_id),
        build_key=row.build_key,
        tree_bytes=row.tree_bytes,
        ext4_bytes=row.ext4_bytes,
        compressed_bytes=row.compressed_bytes,
        ext4_sha256=row.ext4_sha256,
        blob_sha256=row.blob_sha256,
        created_at=row.created_at,
        image_config=dict(row.image_config or {}),
        deleted=row.deleted,
    )


class AssetManager:
    """The ``Assets`` implementation."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        blobs: BlobStore,
        cache_dir: Path,
        *,
        clock: Clock | None = None,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self.factory = factory
        self.blobs = blobs
        self.cache_dir = Path(cache_dir)
        self.clock = clock or SystemClock()
        self.grace_s = grace_s

    def _now(self) -> float:
        return self.clock.time_ns() / 1e9

    def register(self, path: Path, meta: AssetMeta) -> Asset:
        if meta.type != "rootfs":
            raise InvalidInput(f"unknown asset type {meta.type!r}")
        sha = sha256_of(path)
        size = path.stat().st_size
        now = self._now()
        self._claim(sha, size, now)
        self.blobs.put(path, sha)  # after the claim: no gc deletes it from here on
        row = AssetRow(
            asset_id=new_asset_id(),
            type=meta.type,
            customer_id=meta.customer_id,
            source_image=meta.source_image,
            manifest_digest=meta.manifest_digest,
            build_id=meta.build_id,
            build_key=meta.build_key,
            tree_bytes=meta.tree_bytes,
            ext4_bytes=meta.ext4_bytes,
            compressed_bytes=size,
            ext4_sha256=meta.ext4_sha256,
            blob_sha256=sha,
            image_config=json.loads(json.dumps(meta.image_config)),
            created_at=now,
            deleted=False,
        )
        with transaction(self.factory) as s:
            s.add(row)
            # referenced again (a concurrent delete() of another asset may have set it)
            done = s.execute(
                update(AssetBlobRow)
                .where(AssetBlobRow.sha256 == sha, AssetBlobRow.state == LIVE)
                .values(unreferenced_since=None)
            )
            if _rowcount(done) != 1:  # cannot happen while the claim is younger than the grace
                raise UnkeyError(
                    f"blob sha256:{sha} was collected while being registered (register took "
                    f"longer than the {self.grace_s:.0f} s grace)",
                    retryable=True,
                )
        return _asset(row)

    def _claim(self, sha: str, size: int, now: float) -> None:
        """Mark the blob row referenced (or create it) before the blob is stored.

        One conditional statement per attempt: it either claims a ``live`` row, or inserts a new
        one, or takes over a crashed gc's ``deleting`` row; a young ``deleting`` row (a gc is
        deleting this blob right now) is waited out, then the blob is stored again."""
        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            with transaction(self.factory) as s:
                claimed = s.execute(
                    update(AssetBlobRow)
                    .where(AssetBlobRow.sha256 == sha, AssetBlobRow.state == LIVE)
                    .values(unreferenced_since=None, claimed_at=now)
                )
                if _rowcount(claimed) == 1:
                    return
            try:
                with transaction(self.factory) as s:
                    s.add(AssetBlobRow(sha256=sha, size=size, created_at=now,
                                       unreferenced_since=None, state=LIVE,
                                       claimed_at=now))  # fmt: skip
                return
            except IntegrityError:
                pass  # it exists: live again (claim it) or being deleted (wait for gc)
            with transaction(self.factory) as s:
                # a DELETING row older than the grace was left by a crashed gc: take it over
                # (the blob may be gone or not; put() stores it again when missing)
                revived = s.execute(
                    update(AssetBlobRow)
                    .where(AssetBlobRow.sha256 == sha, AssetBlobRow.state == DELETING,
                           AssetBlobRow.claimed_at <= now - self.grace_s)
                    .values(state=LIVE, unreferenced_since=None, claimed_at=now)
                )  # fmt: skip
                if _rowcount(revived) == 1:
                    return
            if time.monotonic() > deadline:
                raise UnkeyError(
                    f"blob sha256:{sha} is still being deleted by gc after {CLAIM_WAIT_S:.0f} s",
                    retryable=True,
                )
            time.sleep(0.02)

    def _row(self, s: Session, asset_id: str) -> AssetRow:
        row = s.get(AssetRow, asset_id)
        if row is None:
            raise NotFound(f"asset {asset_id} not found")
        return row

    def get(self, asset_id: AssetId) -> Asset:
        with self.factory() as s:
            return _asset(self._row(s, asset_id))

    def find(self, build_key: str) -> Asset | None:
        with self.factory() as s:
            row = s.scalars(
                select(AssetRow)
                .where(AssetRow.build_key == build_key, AssetRow.deleted.is_(False))
                .order_by(AssetRow.created_at.desc())
            ).first()
            return _asset(row) if row is not None else None

    def list(self, customer_id: CustomerId | None = None) -> builtins.list[Asset]:
        with self.factory() as s:
            q = select(AssetRow).where(AssetRow.deleted.is_(False)).order_by(AssetRow.created_at)
            if customer_id is not None:
                q = q.where(AssetRow.customer_id == customer_id)
            return [_asset(r) for r in s.scalars(q).all()]

    def local_path(self, asset_id: AssetId) -> Path:
        asset = self.get(asset_id)
        if asset.deleted:
            raise NotFound(f"asset {asset_id} was deleted")
        own = self.blobs.local_path(asset.blob_sha256)
        if own is not None:
            return own
        cached = self.cache_dir / "sha256" / f"{asset.blob_sha256}.zst"
        if cached.exists():
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".dl-")
        os.close(fd)
        try:
            self.blobs.download(asset.blob_sha256, Path(tmp))
            got = sha256_of(Path(tmp))
            if got != asset.blob_sha256:
                raise UnkeyError(f"asset {asset_id}: blob digest mismatch (got sha256:{got})")
            Path(tmp).replace(cached)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return cached

    def fetch(self, asset_id: AssetId, dest: Path) -> Path:
        asset = self.get(asset_id)
        dctx = zstandard.ZstdDecompressor()
        h = hashlib.sha256()
        zero = bytes(65536)
        total = 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        try:
            with (
                self.blobs.open(asset.blob_sha256) as src,
                dctx.stream_reader(src) as r,
                tmp.open("wb") as out,
            ):
                while buf := r.read(1 << 20):
                    h.update(buf)
                    for i in range(0, len(buf), 65536):
                        piece = buf[i : i + 65536]
                        if piece == zero[: len(piece)]:
                            out.seek(len(piece), os.SEEK_CUR)  # a hole: sparse output
                        else:
                            out.write(piece)
                    total += len(buf)
                out.truncate(total)
            if h.hexdigest() != asset.ext4_sha256:
                raise UnkeyError(f"asset {asset_id}: rootfs digest mismatch after decompression")
            tmp.replace(dest)
        except zstandard.ZstdError as exc:  # the stored blob is damaged (bit rot, a bad copy)
            raise UnkeyError(
                f"asset {asset_id}: stored blob sha256:{asset.blob_sha256} is corrupt: {exc}"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _lock(self, s: Session, asset_id: str) -> AssetRow:
        """The asset's row, write-locked for the rest of the transaction: a no-op UPDATE first
        (PostgreSQL locks the row; SQLite takes its write lock, which a SELECT does not), so
        lease() and delete() of one asset serialize and each reads the other's commit."""
        touched = s.execute(
            update(AssetRow).where(AssetRow.asset_id == asset_id).values(deleted=AssetRow.deleted)
        )
        if _rowcount(touched) != 1:
            raise NotFound(f"asset {asset_id} not found")
        return self._row(s, asset_id)

    def lease(self, asset_id: AssetId, holder: str) -> Lease:
        now = self._now()
        with transaction(self.factory) as s:
            row = self._lock(s, asset_id)
            if row.deleted:
                raise Conflict(f"asset {asset_id} was deleted; it cannot be leased")
            existing = s.get(AssetLeaseRow, (asset_id, holder))
            if existing is None:
                s.add(AssetLeaseRow(asset_id=asset_id, holder=holder, created_at=now))
                return Lease(asset_id, holder, now)
            return Lease(asset_id, holder, existing.created_at)

    def release(self, asset_id: AssetId, holder: str) -> None:
        with transaction(self.factory) as s:
            lease = s.get(AssetLeaseRow, (asset_id, holder))
            if lease is not None:
                s.delete(lease)

    def leases(self, asset_id: AssetId) -> builtins.list[Lease]:
        with self.factory() as s:
            rows = s.scalars(select(AssetLeaseRow).where(AssetLeaseRow.asset_id == asset_id))
            return [Lease(AssetId(r.asset_id), r.holder, r.created_at) for r in rows]

    def delete(self, asset_id: AssetId) -> None:
        now = self._now()
        with transaction(self.factory) as s:
            row = self._lock(s, asset_id)
            held = s.scalars(
                select(AssetLeaseRow.holder).where(AssetLeaseRow.asset_id == asset_id)
            ).all()
            if held:
                raise Conflict(
                    f"asset {asset_id} is in use by {', '.join(sorted(held))}; not deleted",
                    suggestion="stop the VMs using it first",
                )
            row.deleted = True
            live = s.scalars(
                select(AssetRow.asset_id).where(
                    AssetRow.blob_sha256 == row.blob_sha256, AssetRow.deleted.is_(False)
                )
            ).first()
            blob = s.get(AssetBlobRow, row.blob_sha256)
            if live is None and blob is not None and blob.unreferenced_since is None:
                blob.unreferenced_since = now

    def gc(self) -> GcReport:
        """Delete blobs no live or leased asset references, unreferenced (or orphaned) for at
        least the grace period. Safe against concurrent ``register``/``gc`` (module docstring)."""
        now = self._now()
        cutoff = now - self.grace_s
        deleted: builtins.list[str] = []
        freed = 0
        with self.factory() as s:
            live = set(
                s.scalars(select(AssetRow.blob_sha256).where(AssetRow.deleted.is_(False))).all()
            )
            leased = set(
                s.scalars(
                    select(AssetRow.blob_sha256).join(
                        AssetLeaseRow, AssetLeaseRow.asset_id == AssetRow.asset_id
                    )
                ).all()
            )
            indexed = {b.sha256: b for b in s.scalars(select(AssetBlobRow)).all()}
        # Deletions a crashed gc left half done (row DELETING for longer than the grace; a
        # younger one belongs to a gc still at work, whose blob delete must not be repeated once
        # a register stored the blob again).
        for sha, brow in indexed.items():
            if brow.state == DELETING and self._retake(sha, cutoff):
                self._finish_delete(sha)
        keep = live | leased  # a first filter only: the conditional update below decides
        stored = list(self.blobs.list())
        listed = {sha for sha, _, _ in stored}
        for sha, mtime, size in stored:
            if sha in keep:
                continue
            row = indexed.get(sha)
            if row is not None and row.state == DELETING:
                continue  # finished above
            if row is None:
                if now - mtime < self.grace_s:
                    continue
                if not self._take_orphan(sha, size, now):
                    continue
            elif not self._take(sha, cutoff):
                continue
            self._finish_delete(sha)
            deleted.append(sha)
            freed += size
            listed.add(sha)
        # Rows whose blob was never stored (a register that failed between claim and store).
        for sha, brow in indexed.items():
            stale = sha not in listed and brow.state == LIVE and sha not in keep
            if stale and self._take(sha, cutoff):
                self._finish_delete(sha)
        return GcReport(deleted, freed, len(leased))

    def _take(self, sha: str, cutoff: float) -> bool:
        """LIVE -> DELETING, only if unclaimed and unreferenced since before ``cutoff`` and no
        live or leased asset references it: one statement, so a concurrent claim either came
        first (no match) or finds the row DELETING and waits."""
        b = AssetBlobRow
        referenced = exists().where(AssetRow.blob_sha256 == sha, AssetRow.deleted.is_(False))
        leased = (
            exists()
            .where(AssetLeaseRow.asset_id == AssetRow.asset_id)
            .where(AssetRow.blob_sha256 == sha)
        )
        stale = or_(
            and_(b.unreferenced_since.is_not(None), b.unreferenced_since <= cutoff),
            and_(
                b.unreferenced_since.is_(None), func.coalesce(b.claimed_at, b.created_at) <= cutoff
            ),
        )
        with transaction(self.factory) as s:
            res = s.execute(
                update(b)
                .where(b.sha256 == sha, b.state == LIVE, stale, ~referenced, ~leased)
                .values(state=DELETING, claimed_at=self._now())
            )
            return _rowcount(res) == 1

    def _retake(self, sha: str, cutoff: float) -> bool:
        """Own a crashed gc's DELETING row (taken before ``cutoff``): one conditional update."""
        b = AssetBlobRow
        with transaction(self.factory) as s:
            res = s.execute(
                update(b)
                .where(b.sha256 == sha, b.state == DELETING, b.claimed_at <= cutoff)
                .values(claimed_at=self._now())
            )
            return _rowcount(res) == 1

    def _take_orphan(self, sha: str, size: int, now: float) -> bool:
        """A stored blob without a row: insert its row as DELETING (fails if a register just
        claimed it, which then keeps it)."""
        try:
            with transaction(self.factory) as s:
                s.add(AssetBlobRow(sha256=sha, size=size, created_at=now, unreferenced_since=now,
                                   state=DELETING, claimed_at=now))  # fmt: skip
        except IntegrityError:
            return False
        return True

    def _finish_delete(self, sha: str) -> None:
        self.blobs.delete(sha)
        cached = self.cache_dir / "sha256" / f"{sha}.zst"
        with contextlib.suppress(FileNotFoundError):
            cached.unlink()
        with transaction(self.factory) as s:  # last: a waiting register may now store it again
            s.execute(
                delete(AssetBlobRow).where(
                    AssetBlobRow.sha256 == sha, AssetBlobRow.state == DELETING
                )
            )


def open_assets(settings: Settings, *, clock: Clock | None = None) -> AssetManager:
    """The asset manager for ``settings`` (control-plane database, configured blob store)."""
    engine = make_engine(settings.resolved_database_url)
    blobs = open_blob_store(
        settings.assets.blob_url,
        settings.data_dir,
        endpoint_url=settings.assets.s3_endpoint_url,
        region=settings.assets.s3_region,
    )
    return AssetManager(session_factory(engine), blobs, settings.data_dir / "assets" / "cache",
                        clock=clock)  # fmt: skip


__all__ = ["AssetManager", "open_assets"]
