"""Assets are content-addressed blobs without a suffix: compression is detected by content."""

from __future__ import annotations

from pathlib import Path

import zstandard

from unkey_deploy.metald.jail import is_zstd


def test_zstd_detected_by_magic_not_by_name(tmp_path: Path) -> None:
    raw = b"\0" * 8192 + b"ext4 data"
    blob = tmp_path / "4f" / "4fa1b2"  # like assets/blobs/sha256/<ab>/<sha>
    blob.parent.mkdir()
    blob.write_bytes(zstandard.ZstdCompressor().compress(raw))
    plain = tmp_path / "rootfs.zst"  # a misleading name on an uncompressed image
    plain.write_bytes(raw)
    assert is_zstd(blob)
    assert not is_zstd(plain)
