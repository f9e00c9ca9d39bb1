"""app.yaml's command and args reach the built image's /.vminit/argv through the deploy adapter.

(Before, ``DeployBuilds`` passed only ``command``: a deployment with ``args`` ran the image's
own CMD.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.builder.service import BuildService, DeployBuilds, OciImageSource
from unkey_deploy.core.ids import new_customer_id
from unkey_deploy.deployer.api import DeployRequest
from unkey_deploy.store.db import make_engine, session_factory, upgrade

pytestmark = pytest.mark.root


def _argv(svc: BuildService, asset_id: str, dest: Path) -> list[str]:
    rootfs = svc.assets.fetch(asset_id, dest)  # type: ignore[arg-type]
    raw = subprocess.run(["debugfs", "-R", "cat /.vminit/argv", str(rootfs)],
                         capture_output=True, check=True).stdout  # fmt: skip
    return raw.decode().split("\0")[:-1]


def test_deploy_command_and_args_are_baked_into_the_init_argv(
    tmp_path: Path, init_binary: Path, app_image: str
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    upgrade(engine)
    factory = session_factory(engine)
    assets = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
    svc = BuildService(factory, assets, OciImageSource(local_sources=True),
                       work_dir=tmp_path / "work", init_binary=init_binary,
                       poll_s=0.05)  # fmt: skip
    svc.start(1)

    def progress(phase: str, message: str, **data: Any) -> None:
        pass

    def req(**kw: Any) -> DeployRequest:
        return DeployRequest(deployment_id="dep_1", customer_id=new_customer_id(),
                             tenant_id="ten_1", request_id="req_1", name="app", image=app_image,
                             vcpus=1, memory_bytes=256 << 20, port=8080, **kw)  # fmt: skip

    try:
        plain = DeployBuilds(svc).build(req(), progress)
        assert _argv(svc, plain.asset_id, tmp_path / "a.ext4") == ["/app/server", "--port", "8080"]
        args = DeployBuilds(svc).build(req(args=("--port", "9090")), progress)
        assert not args.cached and args.asset_id != plain.asset_id  # args are in the cache key
        assert _argv(svc, args.asset_id, tmp_path / "b.ext4") == ["/app/server", "--port", "9090"]
        both = DeployBuilds(svc).build(req(command=("/bin/busybox",), args=("true",)), progress)
        assert _argv(svc, both.asset_id, tmp_path / "c.ext4") == ["/bin/busybox", "true"]
    finally:
        svc.stop()
        engine.dispose()
