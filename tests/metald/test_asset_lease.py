"""A VM launched from an asset holds a lease on it: the asset manager can neither delete the
asset nor garbage-collect its blob while the VM exists; deleting the VM releases it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import zstandard

from unkey_deploy.assets.api import AssetMeta
from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.core.errors import Conflict, VmError
from unkey_deploy.core.ids import BuildId, CustomerId
from unkey_deploy.metald.launch import launch_replica
from unkey_deploy.metald.service import CreateVm, Metald
from unkey_deploy.store.db import make_engine, session_factory, upgrade

MetaldFactory = Callable[..., Metald]


def test_gc_cannot_delete_a_running_vms_asset(
    make_metald: MetaldFactory, rootfs: Path, tmp_path: Path
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'assets.db'}")
    upgrade(engine)
    # grace 0: without the lease, delete + gc would remove the blob at once
    assets = AssetManager(session_factory(engine), FsBlobStore(tmp_path / "blobs"),
                          tmp_path / "cache", grace_s=0.0)  # fmt: skip
    zst = tmp_path / "rootfs.ext4.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(rootfs.read_bytes()))
    meta = AssetMeta(CustomerId("cust_a"), "test:1", "sha256:" + "0" * 64, BuildId("bld_x"),
                     "key-lease", 1, rootfs.stat().st_size, "0" * 64)  # fmt: skip
    asset = assets.register(zst, meta)
    blob = assets.local_path(asset.asset_id)

    md = make_metald("sandbox")
    # a metald without an asset manager refuses a VM it could not lease the asset for
    with pytest.raises(VmError, match="no asset manager"):
        md.create_vm(CreateVm("dep_a", "cust_a", blob, memory_bytes=64 << 20,
                              asset_id=asset.asset_id))  # fmt: skip
    assert md.list() == []
    md.leases = assets

    vm = launch_replica(md, deployment_id="dep_a", customer_id="cust_a", rootfs=blob, vcpus=1,
                        memory_bytes=64 << 20, port=8080, asset_id=asset.asset_id)  # fmt: skip
    assert vm.asset_id == asset.asset_id
    assert [lease.holder for lease in assets.leases(asset.asset_id)] == [vm.vm_id]
    with pytest.raises(Conflict, match=f"in use by {vm.vm_id}"):
        assets.delete(asset.asset_id)
    report = assets.gc()
    assert report.blobs_deleted == [] and report.assets_kept_leased == 1
    assert blob.exists()
    assert vm.url is not None
    assert httpx.get(vm.url + "/", timeout=5).status_code == 200

    md.delete(vm.vm_id)
    assert assets.leases(asset.asset_id) == []
    assets.delete(asset.asset_id)
    assert assets.gc().blobs_deleted == [asset.blob_sha256]
    assert not blob.exists()
    engine.dispose()
