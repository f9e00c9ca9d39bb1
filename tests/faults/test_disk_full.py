"""Disk full (issue 8) on a small tmpfs, under billaged's spool (journal + batch segments) while a
simulated fleet is metered, and under the asset store while an asset is stored: the error must
name the path, nothing accepted may be lost, doubled or left half written, and work carries on
once space returns."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from unkey_deploy.assets.blobs import FsBlobStore, sha256_of
from unkey_deploy.core.errors import UnkeyError
from unkey_deploy.metering.billaged import Billaged
from unkey_deploy.metering.codec import decode_array
from unkey_deploy.metering.sim import SimFleet, checksum, expected

pytestmark = [pytest.mark.root]

VMS = 40
BATCH = 50


@contextlib.contextmanager
def tiny_fs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def _fill_until_full(b: Billaged, fleet: SimFleet, slots: np.ndarray) -> tuple[int, Exception]:
    for k in range(100_000):
        try:
            b.ingest(slots, fleet.rows(k))
        except Exception as exc:  # what escapes is what is checked
            return k, exc
    pytest.fail("the spool never filled up")


@pytest.fixture
def full_spool(tmp_path: Path) -> Iterator[tuple[Path, int, Exception]]:
    """A spool on a 256 KiB tmpfs metered until a tick fails: (dir, failed tick, error)."""
    with tiny_fs(tmp_path / "fs", "256k") as fs:
        spool = fs / "spool"
        b = Billaged(spool, batch_samples=BATCH)
        fleet = SimFleet(VMS)
        slots = np.array([b.slot(k) for k in fleet.keys])
        failed, exc = _fill_until_full(b, fleet, slots)
        assert failed > BATCH, f"full after {failed} ticks: the test spool is too small"
        with contextlib.suppress(Exception):
            if b._journal is not None:
                b._journal.close()
        yield spool, failed, exc


def test_spool_full_error_is_clear_and_names_the_path(
    full_spool: tuple[Path, int, Exception],
) -> None:
    spool, _failed, exc = full_spool
    assert isinstance(exc, UnkeyError), repr(exc)
    assert str(spool) in str(exc) and "space" in str(exc).lower(), str(exc)


def test_spool_full_then_space_returns_nothing_lost_or_doubled(
    full_spool: tuple[Path, int, Exception],
) -> None:
    """After ENOSPC the process restarts (what metald's supervisor does) with space back: it
    recovers from the journal and the spool, the source resumes after each series' last durable
    sample, and the spooled batches hold every sample of every tick exactly once."""
    spool, failed, _exc = full_spool
    _grow(spool.parent, "16m")
    b = Billaged(spool, batch_samples=BATCH)  # recovery must read past a torn tail record
    fleet = SimFleet(VMS)
    slots = np.array([b.slot(k) for k in fleet.keys])
    start = np.array([fleet.tick_of(b.last_t(k), 0) + 1 if b.last_t(k) else 0 for k in fleet.keys])
    assert (start >= failed - 1).all() and (start <= failed + 1).all(), (failed, start)
    end = failed + 3 * BATCH
    for k in range(int(start.min()), end):
        sel = np.flatnonzero(start <= k)
        b.ingest(slots[sel], fleet.rows(k, sel))
    for key in fleet.keys:
        b.stop(key)
    got = [decode_array(sb.data).samples for _seg, _i, sb in b.spool.pending(1_000_000)]
    assert checksum(got) == expected(fleet, end)
    if b._journal is not None:
        b._journal.close()


# -- the asset store --------------------------------------------------------------------------


@pytest.fixture
def full_store(tmp_path: Path) -> Iterator[tuple[Path, Path, str, Exception]]:
    """A 2 MiB asset put into a store on a 1 MiB tmpfs: (store root, asset, sha, error)."""
    asset = tmp_path / "rootfs.ext4.zst"
    asset.write_bytes(np.random.default_rng(1).bytes(2 << 20))
    sha = sha256_of(asset)
    with tiny_fs(tmp_path / "fs", "1m") as fs:
        store = FsBlobStore(fs / "assets")
        with pytest.raises(Exception) as info:  # its type is checked below
            store.put(asset, sha)
        yield fs / "assets", asset, sha, info.value


def test_asset_store_full_error_is_clear_and_names_the_path(
    full_store: tuple[Path, Path, str, Exception],
) -> None:
    root, _asset, _sha, exc = full_store
    assert isinstance(exc, UnkeyError), repr(exc)
    assert str(root) in str(exc) and "space" in str(exc).lower(), str(exc)


def test_asset_store_full_leaves_nothing_half_written_and_recovers(
    full_store: tuple[Path, Path, str, Exception],
) -> None:
    root, asset, sha, _exc = full_store
    store = FsBlobStore(root)
    assert not store.exists(sha)
    assert list(store.list()) == []
    leftovers = [p for p in root.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers  # no temp file eating the space that is left
    _grow(root.parent, "8m")
    store.put(asset, sha)
    with store.open(sha) as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == sha
