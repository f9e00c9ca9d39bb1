"""The assets interface: records and the ``Assets`` Protocol other services program against."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..core.ids import AssetId, BuildId, CustomerId

AssetType = Literal["rootfs"]


@dataclass(frozen=True)
class AssetMeta:
    """What the builder knows about a rootfs it registers."""

    customer_id: CustomerId
    source_image: str
    manifest_digest: str
    build_id: BuildId
    build_key: str  # cache key: manifest digest + build options
    tree_bytes: int
    ext4_bytes: int
    ext4_sha256: str
    image_config: dict[str, Any] = field(default_factory=dict)
    type: AssetType = "rootfs"


@dataclass(frozen=True)
class Asset:
    """One stored asset. The blob (``blob_sha256``) is the zstd-compressed ext4 image."""

    asset_id: AssetId
    type: AssetType
    customer_id: CustomerId
    source_image: str
    manifest_digest: str
    build_id: BuildId
    build_key: str
    tree_bytes: int
    ext4_bytes: int
    compressed_bytes: int
    ext4_sha256: str
    blob_sha256: str
    created_at: float
    image_config: dict[str, Any]
    deleted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Lease:
    asset_id: AssetId
    holder: str
    created_at: float


@dataclass(frozen=True)
class GcReport:
    blobs_deleted: list[str]
    bytes_freed: int
    assets_kept_leased: int


class Assets(Protocol):
    """assetmanagerd."""

    def register(self, path: Path, meta: AssetMeta, /) -> Asset:
        """Store the zstd file ``path`` (content-addressed; identical bytes stored once) and index
        it; the file is left in place."""
        ...

    def get(self, asset_id: AssetId, /) -> Asset:
        """The asset; raises NotFound."""
        ...

    def find(self, build_key: str, /) -> Asset | None:
        """The live asset built under ``build_key`` (the builder's cache), if any."""
        ...

    def local_path(self, asset_id: AssetId, /) -> Path:
        """A local path of the asset's compressed rootfs (``.zst``, which metald accepts);
        downloaded into the local cache first for remote backends."""
        ...

    def fetch(self, asset_id: AssetId, dest: Path, /) -> Path:
        """Decompress the rootfs into ``dest`` (a sparse file), verified against its sha256."""
        ...

    def lease(self, asset_id: AssetId, holder: str, /) -> Lease:
        """Mark the asset in use by ``holder`` (a VM id): it cannot be deleted until released."""
        ...

    def release(self, asset_id: AssetId, holder: str, /) -> None: ...

    def delete(self, asset_id: AssetId, /) -> None:
        """Retire the asset (Conflict while leased); its blob goes at the next ``gc`` after the
        grace period unless another asset shares it."""
        ...

    def gc(self) -> GcReport:
        """Delete blobs that no live asset references, unreferenced for longer than the grace
        period (also orphans left by a crash between upload and index)."""
        ...

    def list(self, customer_id: CustomerId | None = None, /) -> list[Asset]: ...
