"""assetmanagerd over the local FS and over S3 (moto's server): dedupe, fetch, leases, GC."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import zstandard
from sqlalchemy.orm import Session, sessionmaker

from unkey_deploy.assets.api import Asset, AssetMeta
from unkey_deploy.assets.blobs import (
    BlobStore,
    FsBlobStore,
    S3BlobStore,
    open_blob_store,
    sha256_of,
)
from unkey_deploy.assets.service import AssetBlobRow, AssetManager
from unkey_deploy.core.clock import FakeClock
from unkey_deploy.core.errors import Conflict, InvalidInput, NotFound, Unavailable, UnkeyError
from unkey_deploy.core.ids import AssetId, BuildId, CustomerId, new_build_id, new_customer_id

MiB = 1 << 20


def _image(tmp_path: Path, name: str, fill: bytes) -> tuple[Path, str, int]:
    """A sparse 'ext4' of 8 MiB with some data, and its zstd file."""
    raw = tmp_path / f"{name}.ext4"
    with raw.open("wb") as f:
        f.write(fill * 4096)
        f.seek(6 * MiB)
        f.write(b"tail" * 1024)
        # unique content per call: the PostgreSQL index is shared by the tests of a worker, and
        # an equal blob registered by another test would (rightly) keep GC from deleting ours
        f.write(os.urandom(16))
        f.truncate(8 * MiB)
    zst = tmp_path / f"{name}.zst"
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    with raw.open("rb") as fin, zst.open("wb") as fout:
        cctx.copy_stream(fin, fout, size=raw.stat().st_size)
    return zst, sha256_of(raw), raw.stat().st_size


def _meta(customer: CustomerId, sha: str, size: int, key: str) -> AssetMeta:
    return AssetMeta(
        customer_id=customer, source_image="127.0.0.1:5000/app:1",
        manifest_digest="sha256:" + "a" * 64,
        build_id=BuildId(new_build_id()), build_key=key, tree_bytes=1000, ext4_bytes=size,
        ext4_sha256=sha, image_config={"Entrypoint": ["/app"]},
    )  # fmt: skip


def _exercise(mgr: AssetManager, blobs: BlobStore, clock: FakeClock, tmp_path: Path) -> None:
    cust, other = new_customer_id(), new_customer_id()
    k1, k2 = f"k1-{cust}", f"k2-{cust}"
    zst, sha, size = _image(tmp_path, "a", b"A")
    a1 = mgr.register(zst, _meta(cust, sha, size, key=k1))
    a2 = mgr.register(zst, _meta(other, sha, size, key=k2))
    assert a1.asset_id.startswith("ast_") and a1.asset_id != a2.asset_id
    assert a1.blob_sha256 == a2.blob_sha256 == sha256_of(zst)  # stored once
    assert [b[0] for b in blobs.list()] == [a1.blob_sha256]
    assert a1.compressed_bytes == zst.stat().st_size and a1.ext4_bytes == size
    assert mgr.get(a1.asset_id) == a1 and mgr.find(k1) == a1 and mgr.find("nope") is None
    assert [a.asset_id for a in mgr.list(cust)] == [a1.asset_id]

    out = mgr.fetch(a1.asset_id, tmp_path / "vm" / "rootfs.ext4")
    assert sha256_of(out) == sha and out.stat().st_size == size
    assert os.stat(out).st_blocks * 512 < size // 2  # decompressed sparse
    local = mgr.local_path(a1.asset_id)
    assert sha256_of(local) == a1.blob_sha256

    mgr.lease(a1.asset_id, "vm_1")
    with pytest.raises(Conflict, match="in use by vm_1"):
        mgr.delete(a1.asset_id)
    mgr.delete(a2.asset_id)
    clock.advance(10_000)
    assert mgr.gc().blobs_deleted == []  # a1 still live and leased
    mgr.release(a1.asset_id, "vm_1")
    mgr.delete(a1.asset_id)
    assert mgr.find(k1) is None
    assert mgr.gc().blobs_deleted == []  # inside the grace period
    clock.advance(mgr.grace_s + 1)
    report = mgr.gc()
    assert report.blobs_deleted == [a1.blob_sha256] and report.bytes_freed > 0
    assert list(blobs.list()) == []
    with pytest.raises(NotFound):
        mgr.fetch(a1.asset_id, tmp_path / "gone.ext4")


def test_fs_backend(tmp_path: Path, factory: sessionmaker[Session], clock: FakeClock) -> None:
    blobs = FsBlobStore(tmp_path / "blobs")
    mgr = AssetManager(factory, blobs, tmp_path / "cache", clock=clock, grace_s=60)
    _exercise(mgr, blobs, clock, tmp_path)


def test_orphan_blob_collected_after_grace(
    tmp_path: Path, factory: sessionmaker[Session], clock: FakeClock
) -> None:
    """A blob uploaded by a register that crashed before indexing is not kept forever."""
    blobs = FsBlobStore(tmp_path / "blobs")
    zst, _, _ = _image(tmp_path, "o", b"O")
    blobs.put(zst, sha256_of(zst))
    mgr = AssetManager(factory, blobs, tmp_path / "cache", clock=clock, grace_s=60)
    clock.advance(3600 * 24 * 365 * 10)  # mtime-based: far in the future
    assert mgr.gc().blobs_deleted == [sha256_of(zst)]


def test_s3_backend_against_moto_server(
    tmp_path: Path, factory: sessionmaker[Session], clock: FakeClock, s3_endpoint: str
) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip
    client.create_bucket(Bucket="unkey-assets")
    blobs = S3BlobStore("s3://unkey-assets/prod", endpoint_url=s3_endpoint, region="us-east-1",
                        client=client)  # fmt: skip
    mgr = AssetManager(factory, blobs, tmp_path / "cache", clock=clock, grace_s=60)
    _exercise(mgr, blobs, clock, tmp_path)
    listed = client.list_objects_v2(Bucket="unkey-assets").get("Contents", [])
    assert listed == []  # GC deleted the object from the bucket


class _SlowFsBlobStore(FsBlobStore):
    """The real local store with jitter before each write and delete: it widens the window
    between gc's decision and the blob's removal, where a re-register used to slip in."""

    def put(self, path: Path, sha256: str) -> None:
        time.sleep(random.uniform(0, 0.004))
        super().put(path, sha256)

    def delete(self, sha256: str) -> None:
        time.sleep(random.uniform(0, 0.004))
        super().delete(sha256)


def _race_register_and_gcs(mgr: AssetManager, zst: Path, meta: AssetMeta) -> Asset:
    """register(zst) and two gc() runs, released together from a barrier; returns the asset."""
    start = threading.Barrier(3)
    got: list[Asset] = []
    errors: list[BaseException] = []

    def run(fn: Callable[[], object]) -> None:
        try:
            start.wait()
            time.sleep(random.uniform(0, 0.004))
            fn()
        except BaseException as e:  # surfaced below
            errors.append(e)

    jobs: list[Callable[[], object]] = [lambda: got.append(mgr.register(zst, meta)), mgr.gc, mgr.gc]
    threads = [threading.Thread(target=run, args=(f,)) for f in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    (asset,) = got
    return asset


def test_register_racing_gc_never_loses_a_registered_blob(
    tmp_path: Path, factory: sessionmaker[Session], clock: FakeClock
) -> None:
    """A blob whose only asset was deleted (past the grace, so collectible) is registered again
    while two gc runs go: whoever wins, every asset register() returned keeps its blob."""
    blobs = _SlowFsBlobStore(tmp_path / "blobs")
    mgr = AssetManager(factory, blobs, tmp_path / "cache", clock=clock, grace_s=60)
    cust = new_customer_id()
    zst, sha, size = _image(tmp_path, "r", b"R")
    blob = sha256_of(zst)
    first = mgr.register(zst, _meta(cust, sha, size, key=f"r-{cust}"))
    mgr.delete(first.asset_id)
    for i in range(25):
        clock.advance(mgr.grace_s + 1)  # the blob is collectible again
        asset = _race_register_and_gcs(mgr, zst, _meta(cust, sha, size, key=f"r{i}-{cust}"))
        assert blobs.exists(blob), f"round {i}: asset {asset.asset_id} lost its blob"
        out = mgr.fetch(asset.asset_id, tmp_path / f"vm{i}.ext4")
        assert sha256_of(out) == sha
        out.unlink()
        mgr.delete(asset.asset_id)
    # gc is not just refusing to work: with nothing live the blob goes
    clock.advance(mgr.grace_s + 1)
    assert mgr.gc().blobs_deleted == [blob] and not blobs.exists(blob)


def test_a_crashed_gc_deletion_is_finished_or_taken_over_after_the_grace(
    tmp_path: Path, factory: sessionmaker[Session], clock: FakeClock
) -> None:
    """gc marks a blob DELETING before deleting it; if it dies there, the next gc finishes the
    deletion once the mark is older than the grace, or a register takes the blob back."""
    blobs = FsBlobStore(tmp_path / "blobs")
    mgr = AssetManager(factory, blobs, tmp_path / "cache", clock=clock, grace_s=60)
    cust = new_customer_id()
    zst, sha, size = _image(tmp_path, "c", b"C")
    blob = sha256_of(zst)
    for takeover in (True, False):
        a = mgr.register(zst, _meta(cust, sha, size, key=f"c{takeover}-{cust}"))
        mgr.delete(a.asset_id)
        clock.advance(mgr.grace_s + 1)
        assert mgr._take(blob, mgr._now() - mgr.grace_s)  # a gc took it ... and died
        assert mgr.gc().blobs_deleted == []  # a young mark: that gc may still be at work
        assert blobs.exists(blob)
        clock.advance(mgr.grace_s + 1)
        if takeover:
            b = mgr.register(zst, _meta(cust, sha, size, key=f"again-{cust}"))
            clock.advance(mgr.grace_s + 1)
            assert mgr.gc().blobs_deleted == [] and blobs.exists(blob)
            assert sha256_of(mgr.fetch(b.asset_id, tmp_path / "b.ext4")) == sha
            mgr.delete(b.asset_id)
            clock.advance(mgr.grace_s + 1)
            assert mgr.gc().blobs_deleted == [blob]
        else:
            mgr.gc()  # finishes the dead gc's deletion (blob and row)
            assert not blobs.exists(blob)
            with factory() as s:
                assert s.get(AssetBlobRow, blob) is None


def test_listing_skips_a_blob_another_gc_deletes_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FsBlobStore(tmp_path / "blobs")
    kept, gone = (tmp_path / "a"), (tmp_path / "b")
    kept.write_bytes(b"kept")
    gone.write_bytes(b"gone")
    store.put(kept, sha256_of(kept))
    store.put(gone, sha256_of(gone))
    gone_sha = sha256_of(gone)
    real_iterdir = Path.iterdir

    def iterdir_then_delete(self: Path) -> list[Path]:  # the other gc wins between the two
        found = list(real_iterdir(self))
        if any(p.name == gone_sha for p in found):
            store.delete(gone_sha)
        return found

    with monkeypatch.context() as m:
        m.setattr(Path, "iterdir", iterdir_then_delete)
        listed = [sha for sha, _mtime, _size in store.list()]
    assert listed == [sha256_of(kept)]


def test_fetch_of_a_corrupted_blob_is_an_asset_error_and_leaves_nothing(
    tmp_path: Path, factory: sessionmaker[Session], clock: FakeClock
) -> None:
    """A stored blob damaged on disk (bit rot, a bad copy) gives the asset manager's own error
    naming the asset, whatever zstd makes of it; it used to escape as a raw ZstdError (checksum
    or frame errors), and no half-written rootfs is left at the destination."""
    blobs = FsBlobStore(tmp_path / "blobs")
    mgr = AssetManager(factory, blobs, tmp_path / "cache", clock=clock, grace_s=60)
    cust = new_customer_id()
    zst, sha, size = _image(tmp_path, "z", b"Z")
    asset = mgr.register(zst, _meta(cust, sha, size, key=f"z-{cust}"))
    stored = blobs.local_path(asset.blob_sha256)
    assert stored is not None
    good = stored.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    dest = tmp_path / "vm" / "rootfs.ext4"
    for damaged in (bytes(flipped), b"not zstd at all", good[: len(good) // 2]):
        stored.chmod(0o644)
        stored.write_bytes(damaged)
        with pytest.raises(UnkeyError, match=f"asset {asset.asset_id}: "):
            mgr.fetch(asset.asset_id, dest)
        assert not dest.exists() and list(dest.parent.iterdir()) == []


def _s3_store(endpoint: str, url: str) -> S3BlobStore:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip
    return S3BlobStore(url, endpoint_url=endpoint, region="us-east-1", client=client)


def test_s3_upload_failure_is_unavailable_and_registers_nothing(
    tmp_path: Path, factory: sessionmaker[Session], clock: FakeClock, s3_endpoint: str
) -> None:
    """An upload S3 refuses (here: the configured bucket does not exist) is the store's
    Unavailable naming the blob, like every other S3 error; boto3's upload_file raises its own
    S3UploadFailedError (not a ClientError), which used to escape raw from register()."""
    blobs = _s3_store(s3_endpoint, "s3://no-such-bucket/prod")
    mgr = AssetManager(factory, blobs, tmp_path / "cache", clock=clock, grace_s=60)
    cust = new_customer_id()
    zst, sha, size = _image(tmp_path, "u", b"U")
    with pytest.raises(Unavailable, match=f"upload {sha256_of(zst)}: .*NoSuchBucket"):
        mgr.register(zst, _meta(cust, sha, size, key=f"u-{cust}"))
    assert mgr.find(f"u-{cust}") is None and mgr.list(cust) == []


def test_s3_listing_failure_makes_gc_unavailable(
    tmp_path: Path, factory: sessionmaker[Session], clock: FakeClock, s3_endpoint: str
) -> None:
    """gc lists the bucket; when S3 refuses the listing, gc raises the store's Unavailable
    like every other S3 call (the paginator was called outside the error mapping, so a raw
    botocore NoSuchBucket/ClientError escaped)."""
    blobs = _s3_store(s3_endpoint, "s3://no-such-bucket/prod")
    mgr = AssetManager(factory, blobs, tmp_path / "cache", clock=clock, grace_s=60)
    with pytest.raises(Unavailable, match=r"list s3://no-such-bucket/prod: .*NoSuchBucket"):
        mgr.gc()


@pytest.mark.parametrize(
    "form", ["file://blobs{tmp}/x", "file://.{tmp}/b", "file:blobs", "file://"]
)
def test_a_file_blob_url_that_is_not_an_absolute_path_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """``file://blobs/x`` parses as host "blobs" and path "/x": the store silently went to
    /x (or to the current directory for ``file:blobs`` and ``file://``) instead of failing.
    (The wrong places here are all inside tmp_path.)"""
    monkeypatch.chdir(tmp_path)
    url = form.format(tmp=tmp_path)
    with pytest.raises(InvalidInput, match="file:///absolute/path"):
        open_blob_store(url, tmp_path)
    assert isinstance(open_blob_store(f"file://{tmp_path}/b", tmp_path), FsBlobStore)
    assert isinstance(open_blob_store(f"file://localhost{tmp_path}/c", tmp_path), FsBlobStore)


def _race_lease_and_delete(mgr: AssetManager, asset: AssetId) -> list[str]:
    """lease() and delete() of ``asset`` released together; the names of those that passed."""
    start = threading.Barrier(2)
    won: list[str] = []

    def run(name: str, fn: Callable[[], object]) -> None:
        start.wait()
        try:
            fn()
            won.append(name)
        except Conflict:
            pass

    threads = [
        threading.Thread(target=run, args=("lease", lambda: mgr.lease(asset, "vm_1"))),
        threading.Thread(target=run, args=("delete", lambda: mgr.delete(asset))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return won


def test_lease_and_delete_racing_never_leave_a_leased_asset_deleted(
    tmp_path: Path, factory: sessionmaker[Session], clock: FakeClock
) -> None:
    """lease() read "not deleted" and delete() read "no lease" in transactions that took no
    lock first, so both could pass: 41% of racing rounds on SQLite (57% on PostgreSQL) left a
    deleted asset with a lease (delete promises Conflict while leased, lease refuses a deleted
    asset). Exactly one of the two wins now."""
    mgr = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache", clock=clock)
    cust = new_customer_id()
    zst, sha, size = _image(tmp_path, "l", b"L")
    for i in range(30):
        asset = mgr.register(zst, _meta(cust, sha, size, key=f"l{i}-{cust}")).asset_id
        won = _race_lease_and_delete(mgr, asset)
        deleted, leased = mgr.get(asset).deleted, bool(mgr.leases(asset))
        assert len(won) == 1 and (deleted, leased) in ((True, False), (False, True)), (i, won)
