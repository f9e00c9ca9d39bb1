"""builderd end to end over real OCI layouts: build, cache, logs, failure, cancel, priority,
the deploy adapter, and crash recovery (kill -9 of a worker process mid-build)."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from unkey_deploy.assets.blobs import FsBlobStore
from unkey_deploy.assets.service import AssetManager
from unkey_deploy.builder.api import BuildOptions, BuildRequest, BuildState, SourceImage
from unkey_deploy.builder.service import BuildService, DeployBuilds, OciImageSource
from unkey_deploy.core.errors import DeadlineExceeded, IllegalTransition, ImageError
from unkey_deploy.core.ids import BuildId, CustomerId, new_customer_id
from unkey_deploy.store.db import make_engine, session_factory, upgrade

pytestmark = pytest.mark.root


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'control.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def _service(tmp_path: Path, factory: sessionmaker[Session], init: Path, **kw: Any) -> BuildService:
    assets = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
    # builds of oci: layouts made by the tests (a builderd refuses them by default)
    source = kw.pop("source", None) or OciImageSource(local_sources=True)
    return BuildService(factory, assets, source, work_dir=tmp_path / "work", init_binary=init,
                        poll_s=0.05, **kw)  # fmt: skip


@pytest.fixture
def svc(
    tmp_path: Path, factory: sessionmaker[Session], init_binary: Path
) -> Iterator[BuildService]:
    s = _service(tmp_path, factory, init_binary)
    yield s
    s.stop()


def _debugfs_cat(image: Path, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                          check=True).stdout  # fmt: skip


def test_build_then_cached_rebuild(svc: BuildService, app_image: str, tmp_path: Path) -> None:
    cust = new_customer_id()
    svc.start(2)
    lines: list[str] = []
    b = svc.wait(svc.submit(BuildRequest(app_image, cust)), 120, on_log=lines.append)
    assert b.state == BuildState.SUCCEEDED, b.error
    assert b.asset_id is not None and not b.cached and b.manifest_digest
    assert any(line.startswith("harden: removed shells /bin/sh") for line in lines)
    assert any(line.startswith("asset ready") for line in lines)
    assert list(b.log) == lines  # the stored log is what was streamed
    asset = svc.assets.get(b.asset_id)
    assert asset.manifest_digest == b.manifest_digest and asset.customer_id == cust
    assert asset.image_config["config"]["User"] == "app"
    rootfs = svc.assets.fetch(b.asset_id, tmp_path / "out.ext4")
    assert _debugfs_cat(rootfs, "/.vminit/argv") == b"/app/server\x00--port\x008080\x00"
    assert _debugfs_cat(rootfs, "/.vminit/user") == b"1000:1000"
    assert _debugfs_cat(rootfs, "/.vminit/env") == b"PATH=/bin\0A=1\0"
    stat = subprocess.run(["debugfs", "-R", "stat /app/server", str(rootfs)],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "Mode:  0755" in stat  # setuid dropped

    # the same image again is a cache hit (its speed is measured in bench/build.py, not here)
    again = svc.wait(svc.submit(BuildRequest(app_image, cust)), 60)
    assert again.state == BuildState.SUCCEEDED and again.cached
    assert again.asset_id == b.asset_id  # the customer's own asset, reused
    other = svc.wait(svc.submit(BuildRequest(app_image, cust, BuildOptions(keep_shell=True))), 120)
    assert other.state == BuildState.SUCCEEDED and not other.cached  # options are in the key
    assert other.asset_id != b.asset_id


def test_cache_hit_across_customers_gives_an_own_asset_and_shows_no_foreign_ids(
    svc: BuildService, app_image: str
) -> None:
    alice, bob = new_customer_id(), new_customer_id()
    svc.start(1)
    first = svc.wait(svc.submit(BuildRequest(app_image, alice)), 120)
    assert first.state == BuildState.SUCCEEDED and not first.cached and first.asset_id
    bob_log: list[str] = []
    hit = svc.wait(svc.submit(BuildRequest(app_image, bob)), 60, on_log=bob_log.append)
    assert hit.state == BuildState.SUCCEEDED and hit.cached and hit.asset_id
    theirs, mine = svc.assets.get(first.asset_id), svc.assets.get(hit.asset_id)
    # bob has an asset record of his own, over the very same stored blob
    assert mine.asset_id != theirs.asset_id
    assert (mine.customer_id, mine.build_id) == (bob, hit.build_id)
    assert mine.blob_sha256 == theirs.blob_sha256 and mine.ext4_sha256 == theirs.ext4_sha256
    assert [a.asset_id for a in svc.assets.list(bob)] == [mine.asset_id]
    # nothing of alice's reaches bob: not in his log, his build record or his asset record
    seen = repr((bob_log, hit.as_dict(), mine.as_dict()))
    for foreign in (theirs.asset_id, first.build_id, alice):
        assert foreign not in seen
    assert any(line.startswith(f"cache hit: {mine.asset_id}") for line in bob_log)
    # bob's next build reuses his own record instead of minting another one
    again = svc.wait(svc.submit(BuildRequest(app_image, bob)), 60)
    assert again.cached and again.asset_id == mine.asset_id
    # and alice still gets hers (bob's newer record does not become hers)
    assert svc.wait(svc.submit(BuildRequest(app_image, alice)), 60).asset_id == theirs.asset_id


def test_broken_image_fails_without_retry(svc: BuildService, tmp_path: Path) -> None:
    svc.start(1)
    b = svc.wait(svc.submit(BuildRequest(f"oci:{tmp_path}/missing", new_customer_id())), 60)
    assert b.state == BuildState.FAILED and b.attempts == 1
    assert b.error is not None and b.error["code"] == "image_error"
    assert "missing" in b.error["message"] and any(
        x.startswith("failed: image_error") for x in b.log
    )


def test_priority_and_cancel_of_queued_build(svc: BuildService, app_image: str) -> None:
    cust = new_customer_id()
    low = svc.submit(BuildRequest(app_image, cust, priority=0))
    high = svc.submit(BuildRequest(app_image, cust, priority=5))
    doomed = svc.submit(BuildRequest(app_image, cust, priority=9))
    assert svc.cancel(doomed).state == BuildState.CANCELLED
    with pytest.raises(IllegalTransition):
        svc.cancel(doomed)
    svc.run_worker("w", once=True)
    assert svc.get(high).state == BuildState.SUCCEEDED
    assert svc.get(low).state == BuildState.QUEUED


class _BlockingSource(OciImageSource):
    """The real source, but extraction waits until the test releases it."""

    def __init__(self) -> None:
        super().__init__(local_sources=True)
        self.entered = threading.Event()
        self.release_extract = threading.Event()

    def extract(self, image: SourceImage, root: Path, log: Any, /, progress: Any = None) -> None:
        self.entered.set()
        while not self.release_extract.wait(0.05):
            log("extract: waiting")  # a log line is a cancellation point
        super().extract(image, root, log, progress=progress)


def test_cancel_running_build(
    tmp_path: Path, factory: sessionmaker[Session], init_binary: Path, app_image: str
) -> None:
    source = _BlockingSource()
    svc = _service(tmp_path, factory, init_binary, source=source, lease_s=0.6)
    try:
        svc.start(1)
        bid = svc.submit(BuildRequest(app_image, new_customer_id()))
        assert source.entered.wait(30)
        svc.cancel(bid)
        b = svc.wait(bid, 30)
        assert b.state == BuildState.CANCELLED and b.asset_id is None
        assert not (tmp_path / "work" / bid).exists()  # scratch removed
    finally:
        source.release_extract.set()
        svc.stop()


def test_deploy_adapter_streams_progress_and_raises_build_errors(
    svc: BuildService, app_image: str, tmp_path: Path
) -> None:
    from unkey_deploy.deployer.api import DeployRequest

    svc.start(1)
    events: list[tuple[str, str]] = []

    def progress(phase: str, message: str, **data: Any) -> None:
        events.append((phase, message))

    def req(image: str) -> DeployRequest:
        return DeployRequest(deployment_id="dep_1", customer_id=new_customer_id(),
                             tenant_id="ten_1", request_id="req_1", name="app", image=image,
                             vcpus=1, memory_bytes=256 << 20, port=8080)  # fmt: skip

    built = DeployBuilds(svc).build(req(app_image), progress)
    assert built.asset_id.startswith("ast_") and built.rootfs_bytes > 0 and not built.cached
    assert any(m.startswith("asset ready") for _, m in events)
    assert svc.assets.local_path(built.asset_id).read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    with pytest.raises(ImageError):
        DeployBuilds(svc).build(req(f"oci:{tmp_path}/nope"), progress)


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from unkey_deploy.assets.blobs import FsBlobStore
    from unkey_deploy.assets.service import AssetManager
    from unkey_deploy.builder.service import BuildService, OciImageSource
    from unkey_deploy.store.db import make_engine, session_factory

    class Slow(OciImageSource):
        def extract(self, image, root, log, progress=None):
            log("extract: slow worker started")
            time.sleep(120)

    url, tmp, init = sys.argv[1:4]
    f = session_factory(make_engine(url))
    assets = AssetManager(f, FsBlobStore(Path(tmp) / "blobs"), Path(tmp) / "cache")
    svc = BuildService(f, assets, Slow(local_sources=True), work_dir=Path(tmp) / "work",
                       init_binary=Path(init), lease_s=1.0, poll_s=0.05)
    svc.run_worker("doomed-worker")
""")


@contextlib.contextmanager
def _doomed_worker(
    svc: BuildService, bid: str, db_url: str, tmp_path: Path, init_binary: Path
) -> Iterator[None]:
    """A worker process (WORKER) that claims ``bid`` and starts building it; the block runs
    while it builds, then it is killed (SIGKILL) mid-build."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER, db_url, str(tmp_path), str(init_binary)])
    try:
        deadline = time.monotonic() + 60
        while not any("slow worker started" in x for x in svc.get(bid).log):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        yield
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_killed_mid_build_is_retried_by_another(
    tmp_path: Path, factory: sessionmaker[Session], db_url: str, init_binary: Path, app_image: str
) -> None:
    svc = _service(tmp_path, factory, init_binary, lease_s=1.0)
    bid = svc.submit(BuildRequest(app_image, CustomerId(new_customer_id())))
    with _doomed_worker(svc, bid, db_url, tmp_path, init_binary):
        assert svc.get(bid).state == BuildState.RUNNING
    try:
        svc.start(1)
        b = svc.wait(bid, 120)
    finally:
        svc.stop()
    assert b.state == BuildState.SUCCEEDED and b.attempts == 2 and b.asset_id
    assert any("on doomed-worker" in x for x in b.log)


def test_built_rootfs_starts_under_bwrap_without_a_shell(
    tmp_path: Path, app_image: str, init_binary: Path
) -> None:
    """The pipeline's output runs as metald's sandbox runs it: ``bwrap --as-pid-1 /.vminit/init``
    over the image's tree, with /bin/sh removed, as the image's user, in its WorkingDir."""
    from unkey_deploy.builder.service import build_rootfs
    from unkey_deploy.core.config import BuilderConfig

    script = 'echo "$(id -u) $(pwd) $A $B"; exit 5'
    opts = BuildOptions(command=("/bin/busybox", "sh", "-c", script), env={"B": "two"})
    out = build_rootfs(OciImageSource(local_sources=True), app_image, opts, tmp_path / "w",
                       init_binary=init_binary, config=BuilderConfig(),
                       log=lambda _: None)  # fmt: skip
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {tree}", str(out.rootfs)], check=True,
                   capture_output=True)  # fmt: skip
    assert not (tree / "bin/sh").exists() and not (tree / "bin/sh").is_symlink()
    # fmt: off
    cmd = ["bwrap", "--unshare-pid", "--as-pid-1", "--unshare-uts", "--bind", str(tree), "/",
           "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--clearenv", "/.vminit/init"]
    # fmt: on
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout.strip() == "1000 /app 1 two"


def test_progress_throttle_bounds_the_rate_and_keeps_every_final_and_step() -> None:
    from unkey_deploy.builder.api import BuildProgress
    from unkey_deploy.builder.service import ProgressThrottle

    now = [0.0]
    out: list[tuple[str, int]] = []
    throttle = ProgressThrottle(lambda p: out.append((p.item, p.done)), 0.25, lambda: now[0])
    total = 100 << 20
    for mib in range(1, 101):  # 100 chunks of 1 MiB, 1/64 s apart (exact in binary)
        now[0] += 1 / 64
        throttle(BuildProgress("layer 1/1 sha256:ab", mib << 20, total))
        if mib == 50:
            throttle(BuildProgress("layer 1/1 sha256:ab", 10 << 20, total))  # never backwards
    throttle(BuildProgress("layer 1/1 sha256:ab", total, total))  # nothing after the final
    for step in (0, 1, 1, 2, 3):  # steps all pass, each once, however fast
        throttle(BuildProgress("rootfs", step, 3, "steps"))
    layer = [d >> 20 for item, d in out if item.startswith("layer")]
    # the first, then one per 250 ms (every 16th chunk), then the final (once)
    assert layer == [1, 17, 33, 49, 65, 81, 97, 100]
    assert [d for item, d in out if item == "rootfs"] == [0, 1, 2, 3]


def test_deploy_adapter_that_gives_up_waiting_cancels_its_build(
    tmp_path: Path, factory: sessionmaker[Session], init_binary: Path, app_image: str
) -> None:
    """DeployBuilds waits ``timeout_s`` and then raises DeadlineExceeded; the build it
    submitted for that deploy (nobody else's) used to go on holding a worker, and every retry
    of the deploy submitted one more. Giving up now cancels it."""
    from unkey_deploy.deployer.api import DeployRequest

    source = _BlockingSource()
    svc = _service(tmp_path, factory, init_binary, source=source, lease_s=0.6)
    seen: list[str] = []

    def progress(phase: str, message: str, **data: Any) -> None:
        if data.get("build_id"):
            seen.append(str(data["build_id"]))

    req = DeployRequest(deployment_id="dep_1", customer_id=new_customer_id(), tenant_id="ten_1",
                        request_id="req_1", name="app", image=app_image, vcpus=1,
                        memory_bytes=256 << 20, port=8080)  # fmt: skip
    try:
        svc.start(1)
        with pytest.raises(DeadlineExceeded):
            DeployBuilds(svc, timeout_s=1.0).build(req, progress)
        b = svc.wait(BuildId(seen[0]), 30)
        assert b.state == BuildState.CANCELLED and b.asset_id is None
    finally:
        source.release_extract.set()
        svc.stop()


def test_scratch_of_a_worker_killed_on_its_last_attempt_is_removed(
    tmp_path: Path, factory: sessionmaker[Session], db_url: str, init_binary: Path, app_image: str
) -> None:
    """A worker killed mid-build leaves its scratch (tree, ext4, zst: gigabytes for a real
    image). A retry on this host removed it, but when no attempt follows (the last attempt
    died, or the build was cancelled meanwhile) nothing ever did. Now the worker loop that
    finds the dead worker's lease expired removes it (and starting the workers removes that of
    builds no longer running)."""
    svc = _service(tmp_path, factory, init_binary, lease_s=1.0, max_attempts=1)
    bid = svc.submit(BuildRequest(app_image, CustomerId(new_customer_id())))
    with _doomed_worker(svc, bid, db_url, tmp_path, init_binary):
        pass
    scratch = tmp_path / "work" / bid
    assert (scratch / "attempt-1" / "root").is_dir()  # what the killed worker left
    time.sleep(1.2)  # its lease runs out
    try:
        svc.start(1)
        b = svc.wait(bid, 30)
        assert b.state == BuildState.FAILED and "lost its lease" in str(b.error)
        deadline = time.monotonic() + 30
        while scratch.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        svc.stop()
    assert not scratch.exists()


class _StallingProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to a real registry; a big blob (a layer) gets half its bytes, then nothing
    until ``release`` is set: a registry or network that stalls mid-pull."""

    upstream = ""
    release = threading.Event()
    stalled = threading.Event()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        r = httpx.get(self.upstream + self.path, headers={"Accept": self.headers["Accept"] or ""})
        self.send_response(r.status_code)
        for k in ("content-type", "docker-content-digest"):
            if k in r.headers:
                self.send_header(k, r.headers[k])
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        if "/blobs/" in self.path and len(r.content) > 100_000:
            self.wfile.write(r.content[: len(r.content) // 2])
            self.wfile.flush()
            self.stalled.set()
            self.release.wait(120)
        self.wfile.write(r.content)


@contextlib.contextmanager
def _stalled_pull(tmp_path: Path) -> Iterator[tuple[type[_StallingProxy], str]]:
    """A real registry holding the test app, behind a :class:`_StallingProxy`: yields the
    proxy's handler class (``stalled``, ``release``) and the image reference through it."""
    from unkey_deploy.testing import images as im
    from unkey_deploy.testing.registry import start_registry

    reg = start_registry(tmp_path / "registry")
    handler = type("H", (_StallingProxy,), {"upstream": reg.url, "release": threading.Event(),
                                            "stalled": threading.Event()})  # fmt: skip
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        im.push(reg.host, "test/app", "v1", im.http_app_image())
        yield handler, f"127.0.0.1:{srv.server_address[1]}/test/app:v1"
    finally:
        handler.release.set()
        srv.shutdown()
        srv.server_close()
        reg.stop()


def test_cancel_reaches_a_build_whose_layer_download_stalls(
    tmp_path: Path, factory: sessionmaker[Session], init_binary: Path
) -> None:
    """Cancellation was checked only when layer data arrived: a build whose registry stalled
    mid-layer ignored its cancel until the read timed out (60 s; never, for a registry that
    drips a byte now and then). Waiting for data now checks it too."""
    svc = _service(tmp_path, factory, init_binary, lease_s=0.6)
    with _stalled_pull(tmp_path) as (handler, image):
        try:
            svc.start(1)
            bid = svc.submit(BuildRequest(image, new_customer_id()))
            assert handler.stalled.wait(60)
            svc.cancel(bid)
            b = svc.wait(bid, 20)  # the heartbeat (every 0.2 s) sees the request
            assert b.state == BuildState.CANCELLED
        finally:
            handler.release.set()
            svc.stop()


@pytest.mark.parametrize("image", ["oci:/etc", "docker-archive:/etc/shadow"])
def test_a_builderd_builds_no_image_from_its_own_files(
    tmp_path: Path, factory: sessionmaker[Session], init_binary: Path, image: str
) -> None:
    """A customer naming a path on the builder's host (``oci:PATH``, ``docker-archive:PATH``)
    got that host's files opened for them (an image built from them, or their existence
    told); a builderd now refuses, unless builder.local_sources is on."""
    svc = _service(tmp_path, factory, init_binary, source=OciImageSource())
    try:
        svc.start(1)
        b = svc.wait(svc.submit(BuildRequest(image, new_customer_id())), 30)
        assert b.state == BuildState.FAILED and b.error is not None
        assert b.error["code"] == "image_error", b.error
        assert "builder.local_sources is off" in b.error["message"]
        assert b.attempts == 1
    finally:
        svc.stop()


def test_a_build_longer_than_max_build_s_fails_and_frees_its_worker(
    tmp_path: Path, factory: sessionmaker[Session], init_binary: Path
) -> None:
    """A registry that stalls (or drips a byte now and then, inside the read timeout) held a
    worker for as long as it liked: the attempt now fails at builder.max_build_s, not retried."""
    from unkey_deploy.core.config import BuilderConfig

    svc = _service(tmp_path, factory, init_binary, config=BuilderConfig(max_build_s=3.0))
    with _stalled_pull(tmp_path) as (handler, image):
        try:
            svc.start(1)
            bid = svc.submit(BuildRequest(image, new_customer_id()))
            assert handler.stalled.wait(60)
            b = svc.wait(bid, 30)
            assert b.state == BuildState.FAILED
            assert b.error is not None and b.error["code"] == "deadline_exceeded", b.error
            assert "builder.max_build_s (3 s)" in b.error["message"]
            assert b.attempts == 1
        finally:
            handler.release.set()
            svc.stop()


def test_a_full_work_disk_is_resource_exhausted_naming_it(
    tmp_path: Path, factory: sessionmaker[Session], init_binary: Path, oci_layout: Any
) -> None:
    """A work directory that fills up while layers are extracted failed the build as
    "internal error: OSError(28, 'No space left on device')"; it is the ResourceExhausted,
    naming the work directory, that mkfs running out of space gives."""
    work = tmp_path / "small"
    work.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(work)], check=True)
    try:
        image = oci_layout(tmp_path / "layout", {"Entrypoint": ["/big"]},
                           [[("big", os.urandom(6 << 20), 0o755, None)]])  # fmt: skip
        assets = AssetManager(factory, FsBlobStore(tmp_path / "blobs"), tmp_path / "cache")
        svc = BuildService(factory, assets, OciImageSource(local_sources=True), work_dir=work,
                           poll_s=0.05,
                           init_binary=init_binary, max_attempts=1)  # fmt: skip
        try:
            svc.start(1)
            b = svc.wait(svc.submit(BuildRequest(image, new_customer_id())), 60)
        finally:
            svc.stop()
    finally:
        subprocess.run(["umount", "-l", str(work)], check=True)
    assert b.state == BuildState.FAILED and b.error is not None
    assert b.error["code"] == "resource_exhausted", b.error
    assert str(work) in b.error["message"] and "No space left" in b.error["message"]
