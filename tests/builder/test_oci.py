"""The OCI client and sources against a real registry (Debian's docker-registry) with token auth.

The registry, its token server and the little proxies are started here on 127.0.0.1 and stopped
after. The proxy in front of the registry forwards everything but can inject 5xx/429 answers and
redirect blob downloads to a second "storage" host that records the headers it receives.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.server
import json
import os
import re
import socket
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from unkey_deploy.builder.layers import EPOCH, extract_image
from unkey_deploy.builder.oci import Reference, RegistryClient
from unkey_deploy.builder.source import resolve
from unkey_deploy.core.config import BuilderConfig
from unkey_deploy.core.errors import ImageError, Unauthenticated
from unkey_deploy.core.net import free_port
from unkey_deploy.testing import images as im
from unkey_deploy.testing.registry import Registry, start_registry

CREDS = ("builder", "s3cret-pass")


@dataclass
class Pushed:
    reg: Registry
    multi: im.Built
    http_app: im.Built


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    reg = start_registry(tmp_path_factory.mktemp("registry"), auth=CREDS)
    try:
        multi = im.multilayer_image()
        app = im.http_app_image()
        im.push(reg.host, "test/multi", "latest", multi, CREDS)
        im.push(reg.host, "test/multi-docker", "latest", im.multilayer_image(docker=True), CREDS)
        im.push(reg.host, "test/multi-zstd", "latest", im.multilayer_image("zstd"), CREDS)
        im.push(reg.host, "test/multi-plain", "latest", im.multilayer_image(""), CREDS)
        im.push(reg.host, "test/index", "latest", im.multiarch_index(), CREDS)
        im.push(reg.host, "test/app", "v1", app, CREDS)
        yield Pushed(reg, multi, app)
    finally:
        reg.stop()


def mk(p: Path) -> Path:
    p.mkdir()
    return p


def tree(root: Path) -> dict[str, tuple[str, int, int, int, bytes | str]]:
    """(type, mode, uid, mtime, content or link target) for every path below root."""
    out: dict[str, tuple[str, int, int, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath, n)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", 0, st.st_uid, int(st.st_mtime), os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_uid, int(st.st_mtime), "")
            else:
                out[rel] = (
                    "f",
                    stat.S_IMODE(st.st_mode),
                    st.st_uid,
                    int(st.st_mtime),
                    p.read_bytes(),
                )
    return out


def check_multilayer_tree(root: Path) -> None:
    for rel, content in im.MULTILAYER_EXPECT.items():
        assert (root / rel).read_bytes() == content, rel
    for rel in im.MULTILAYER_ABSENT:
        assert not os.path.lexists(root / rel), rel
    assert os.readlink(root / "abs-link") == "/etc/os-release"  # absolute symlink kept as-is
    assert (root / "opq").is_dir() and sorted(os.listdir(root / "opq")) == ["new"]
    assert stat.S_IMODE((root / "usr/bin/tool").stat().st_mode) == 0o4755  # setuid kept
    main, link = (root / "app/main.sh").stat(), (root / "app/main-link").stat()
    assert main.st_ino == link.st_ino  # hardlink, not a copy
    if os.geteuid() == 0:
        assert (main.st_uid, main.st_gid) == (1000, 1000)
        assert (root / "app").stat().st_uid == 1000
    for rel, (_, _, _, mtime, _) in tree(root).items():
        assert mtime <= EPOCH, rel
    assert int(root.stat().st_mtime) == EPOCH


def test_pull_multilayer_with_token_auth(pushed: Pushed, tmp_path: Path) -> None:
    reg = pushed.reg
    before = len(reg.token_requests)
    client = RegistryClient(credentials={reg.host: CREDS})
    progress: dict[int, int] = {}
    with client, resolve(reg.ref("test/multi"), client=client) as img:
        assert img.manifest_digest == pushed.multi.digest
        assert img.entrypoint == ["/app/main.sh"] and img.cmd == ["--flag"]
        assert img.env == ["PATH=/usr/bin:/bin", "A=1"]
        assert (img.working_dir, img.user, img.exposed_ports) == ("/app", "1000:1000", ["8080/tcp"])
        assert len(img.layers) == 3
        stats = extract_image(
            img, tmp_path, progress=lambda i, done, total: progress.__setitem__(i, done)
        )
        sizes = {la.index: la.size for la in img.layers}
    check_multilayer_tree(tmp_path)
    assert sorted(stats.skipped_devices) == ["/dev/null", "/fifo"]
    assert progress == sizes  # every compressed byte reported, per layer
    # The token flow happened: a 401 challenge, then one token for the repository scope,
    # reused for the manifest, the config and all three layers.
    assert client.stats["challenges"] == 1
    assert client.stats["tokens"] == 1
    new = reg.token_requests[before:]
    assert len(new) == 1
    assert new[0]["query"]["scope"] == ["repository:test/multi:pull"]
    assert new[0]["auth"].startswith("Basic ")


def test_anonymous_and_wrong_password_are_refused(pushed: Pushed) -> None:
    with pytest.raises(Unauthenticated, match=r"token server .* refused the credentials"):
        resolve(pushed.reg.ref("test/multi"))
    with pytest.raises(Unauthenticated, match="refused the credentials"):
        resolve(pushed.reg.ref("test/multi"), credentials={pushed.reg.host: ("builder", "wrong")})


@pytest.mark.parametrize("repo", ["test/multi-docker", "test/multi-zstd", "test/multi-plain"])
def test_docker_schema2_zstd_and_plain_layers_give_the_same_tree(
    pushed: Pushed, tmp_path: Path, repo: str
) -> None:
    creds = {pushed.reg.host: CREDS}
    with resolve(pushed.reg.ref("test/multi"), credentials=creds) as img:
        extract_image(img, mk(tmp_path / "a"))
    with resolve(pushed.reg.ref(repo), credentials=creds) as img:
        if repo.endswith("docker"):
            assert img.manifest_media_type == im.DOCKER_MANIFEST
        extract_image(img, mk(tmp_path / "b"))
    check_multilayer_tree(tmp_path / "b")
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def test_multiarch_index_resolves_to_amd64(pushed: Pushed, tmp_path: Path) -> None:
    idx = im.multiarch_index()
    with resolve(pushed.reg.ref("test/index"), credentials={pushed.reg.host: CREDS}) as img:
        assert img.index_digest == idx.digest
        amd64 = next(m for m in idx.doc()["manifests"] if m["platform"]["architecture"] == "amd64")
        assert img.manifest_digest == amd64["digest"]
        assert img.config["architecture"] == "amd64"
        extract_image(img, tmp_path)
    assert (tmp_path / "etc/arch").read_text() == "amd64\n"


def test_http_app_image(pushed: Pushed, tmp_path: Path) -> None:
    with resolve(pushed.reg.ref("test/app", "v1"), credentials={pushed.reg.host: CREDS}) as img:
        assert img.entrypoint == ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/app/www"]
        assert img.working_dir == "/app" and img.exposed_ports == ["8080/tcp"]
        assert "GREETING=hello" in img.env
        extract_image(img, tmp_path)
    assert (tmp_path / "app/www/index.html").read_bytes() == im.INDEX_HTML
    assert (tmp_path / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.access(tmp_path / "bin/busybox", os.X_OK)
    assert os.readlink(tmp_path / "bin/httpd") == "busybox"


def test_pull_by_digest_and_tag_mismatch(pushed: Pushed) -> None:
    creds = {pushed.reg.host: CREDS}
    ref = f"{pushed.reg.host}/test/multi@{pushed.multi.digest}"
    with resolve(ref, credentials=creds) as img:
        assert img.manifest_digest == pushed.multi.digest
    with pytest.raises(ImageError, match="not found in registry"):
        resolve(pushed.reg.ref("test/multi", "nope"), credentials=creds)


def test_huge_manifest_from_registry_is_refused(pushed: Pushed) -> None:
    big = im.image(
        [im.Layer.of([im.E("a", data=b"a")])],
        entrypoint=["/x"],
        manifest_extra={"annotations": {f"k{i}": "v" * 100 for i in range(300)}},
    )
    im.push(pushed.reg.host, "test/huge", "latest", big, CREDS)
    cfg = BuilderConfig(max_manifest_bytes=16_384)
    with pytest.raises(ImageError, match=r"(over|exceeds) the 16384-byte limit"):
        resolve(pushed.reg.ref("test/huge"), config=cfg, credentials={pushed.reg.host: CREDS})


# -- a proxy in front of the registry: faults and blob redirects ------------------------------


RESET = 0  # a fault "status": reset the connection instead of answering


@dataclass
class ProxyState:
    upstream: str
    blobs: dict[str, bytes]
    blob_host: str = ""
    redirect_blobs: bool = False
    tamper: str = ""  # "", "flip", "extra", "short"
    faults: list[tuple[str, int]] = field(default_factory=list)  # (path part, status) answered once
    front_seen: list[tuple[str, str | None]] = field(default_factory=list)
    blob_seen: list[tuple[str, str | None]] = field(default_factory=list)
    front: str = ""
    basic: str | None = None  # when set, the front itself demands this Basic Authorization
    gzip: bool = False  # answer gzip-encoded when the client accepts it (a compressing proxy)


class _Front(http.server.BaseHTTPRequestHandler):
    state: ProxyState

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        st = self.state
        st.front_seen.append((self.path, self.headers.get("Authorization")))
        if st.basic is not None and self.headers.get("Authorization") != st.basic:
            self._send(401, {"WWW-Authenticate": 'Basic realm="test"'}, b"")
            return
        for i, (part, status) in enumerate(st.faults):
            if part in self.path:
                del st.faults[i]
                if status == RESET:  # the connection drops (TCP RST) before any answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))  # fmt: skip
                    self.connection.close()
                    self.close_connection = True
                    return
                self._send(status, {"Retry-After": "2"} if status == 429 else {}, b"busy")
                return
        if st.redirect_blobs and "/blobs/sha256:" in self.path:
            digest = self.path.rsplit("/", 1)[1]
            self._send(307, {"Location": f"http://{st.blob_host}/storage/{digest}?sig=abc"}, b"")
            return
        h = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
        r = httpx.get(st.upstream + self.path, headers=h)
        keep = ("content-type", "www-authenticate", "docker-content-digest")
        out = {k: v for k, v in r.headers.items() if k.lower() in keep}
        body = r.content
        if st.gzip and "gzip" in self.headers.get("Accept-Encoding", "") and r.status_code == 200:
            out["Content-Encoding"], body = "gzip", gzip.compress(body, mtime=0)
        self._send(r.status_code, out, body)


class _Storage(_Front):
    def do_GET(self) -> None:
        st = self.state
        st.blob_seen.append((self.path, self.headers.get("Authorization")))
        digest = self.path.split("/storage/", 1)[1].split("?")[0]
        data = st.blobs.get(digest)
        if data is None:
            self._send(404, {}, b"")
            return
        if st.tamper == "flip":
            data = data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:]
        elif st.tamper == "extra":
            data = data + b"\0" * 64
        elif st.tamper == "short":
            data = data[: len(data) // 2]
        self._send(200, {"Content-Type": "application/octet-stream"}, data)


@pytest.fixture
def proxy(pushed: Pushed) -> Iterator[ProxyState]:
    with _serve(ProxyState(upstream=pushed.reg.url, blobs={**pushed.multi.blobs})) as state:
        yield state


@contextlib.contextmanager
def _serve(state: ProxyState) -> Iterator[ProxyState]:
    servers = []
    for handler in (_Front, _Storage):
        cls = type(handler.__name__, (handler,), {"state": state})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    state.blob_host = f"127.0.0.1:{servers[1].server_address[1]}"
    state.front = f"127.0.0.1:{servers[0].server_address[1]}"
    try:
        yield state
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def test_blob_redirect_to_another_host_does_not_leak_the_token(
    proxy: ProxyState, tmp_path: Path
) -> None:
    proxy.redirect_blobs = True
    front = proxy.front
    with resolve(f"{front}/test/multi:latest", credentials={front: CREDS}) as img:
        extract_image(img, tmp_path)
    check_multilayer_tree(tmp_path)
    # The registry host got the bearer token for manifests; the storage host never saw it.
    assert any(
        p.startswith("/v2/test/multi/manifests/") and a and a.startswith("Bearer ")
        for p, a in proxy.front_seen
    )
    assert len(proxy.blob_seen) == 4  # config + 3 layers
    assert all(a is None for _, a in proxy.blob_seen), proxy.blob_seen


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("flip", "digest mismatch"),
        ("extra", "larger than its descriptor|announces"),
        ("short", "truncated"),
    ],
)
def test_tampered_blob_from_storage_is_refused(
    proxy: ProxyState, tmp_path: Path, tamper: str, message: str
) -> None:
    proxy.redirect_blobs = True
    front = proxy.front
    with resolve(f"{front}/test/multi:latest", credentials={front: CREDS}) as img:
        proxy.tamper = tamper
        with pytest.raises(ImageError, match=message):
            extract_image(img, tmp_path)


def test_retries_5xx_and_429_with_backoff_and_retry_after(proxy: ProxyState) -> None:
    front = proxy.front
    proxy.faults = [("/manifests/", 503), ("/manifests/", 429), ("/blobs/", 502)]
    sleeps: list[float] = []
    client = RegistryClient(credentials={front: CREDS}, sleep=sleeps.append)
    with client, resolve(f"{front}/test/multi:latest", client=client) as img:
        assert img.manifest_digest
    assert sleeps == [0.25, 2.0, 0.25]  # backoff, Retry-After, backoff (per request)
    assert client.stats["retries"] == 3


def test_a_connection_reset_is_retried_like_other_network_errors(proxy: ProxyState) -> None:
    """A flaky network or a restarting registry resets connections (ECONNRESET while waiting
    for the answer): the request is retried, and when that never stops, an ImageError says so
    (it used to escape as a raw httpx.ReadError, never retried)."""
    front = proxy.front
    proxy.faults = [("/manifests/", RESET), ("/blobs/", RESET)]
    sleeps: list[float] = []
    client = RegistryClient(credentials={front: CREDS}, sleep=sleeps.append)
    with client, resolve(f"{front}/test/multi:latest", client=client) as img:
        assert img.manifest_digest
    assert sleeps == [0.25, 0.25] and client.stats["retries"] == 2
    proxy.faults = [("/manifests/", RESET)] * 3
    client = RegistryClient(credentials={front: CREDS}, sleep=sleeps.append, retries=2)
    with client, pytest.raises(ImageError, match="registry unreachable") as info:
        resolve(f"{front}/test/multi:latest", client=client)
    assert info.value.retryable


def test_a_proxy_that_compresses_answers_gets_no_chance_to(
    proxy: ProxyState, tmp_path: Path
) -> None:
    """Digests are over the registry's stored bytes, so the client must ask for them as they
    are: it announced "Accept-Encoding: gzip, deflate, zstd" (httpx's default) yet hashed the
    raw answer, and a proxy or CDN honouring that (gzip on for JSON) broke every pull with a
    digest mismatch."""
    proxy.gzip = True
    front = proxy.front
    with resolve(f"{front}/test/multi:latest", credentials={front: CREDS}) as img:
        extract_image(img, tmp_path)
    check_multilayer_tree(tmp_path)


def test_gives_up_after_retries(proxy: ProxyState) -> None:
    front = proxy.front
    proxy.faults = [("/manifests/", 503)] * 10
    sleeps: list[float] = []
    client = RegistryClient(credentials={front: CREDS}, sleep=sleeps.append, retries=3)
    with client, pytest.raises(ImageError, match="HTTP 503 after 4 attempts") as info:
        resolve(f"{front}/test/multi:latest", client=client)
    assert info.value.retryable
    assert sleeps == [0.25, 0.5, 1.0]


def test_connect_errors_are_retried_then_reported() -> None:
    host = f"127.0.0.1:{free_port()}"  # nothing listens here
    sleeps: list[float] = []
    client = RegistryClient(sleep=sleeps.append, retries=2)
    with client, pytest.raises(ImageError, match="registry unreachable"):
        resolve(f"{host}/test/x:latest", client=client)
    assert sleeps == [0.25, 0.5]


# -- references, schemes and the other sources --------------------------------------------------


def test_reference_parsing() -> None:
    r = Reference.parse("alpine")
    assert (r.registry, r.repository, r.tag) == ("registry-1.docker.io", "library/alpine", "latest")
    d = "sha256:" + "a" * 64
    r = Reference.parse(f"127.0.0.1:5000/team/app:v1@{d}")
    assert (r.registry, r.repository, r.tag, r.digest, r.ref) == (
        "127.0.0.1:5000",
        "team/app",
        "v1",
        d,
        d,
    )
    for bad in ("", "UPPER/case", "a b", "x@sha256:123", "reg.io/app:bad tag"):
        with pytest.raises(ImageError):
            Reference.parse(bad)


@pytest.mark.parametrize(
    "image",
    [
        "h:abc/x",
        "[::1/x",
        "a..b.com/x",
        "[zz::1]:5000/x",
        "xn--.com/x",
        "xn--zz.com/x",
        "h:99999/x",
    ],
)
def test_an_invalid_registry_host_is_an_image_error_naming_it(image: str) -> None:
    """The registry part is outside input too: a bad port, an unclosed or bogus IPv6 literal,
    an empty or malformed DNS label used to reach httpx/idna and escape as a raw
    httpx.InvalidURL, ValueError, UnicodeError or IDNAError (or a DNS lookup of nonsense)."""
    registry = image.rsplit("/", 1)[0]
    sleeps: list[float] = []
    with (
        RegistryClient(retries=0, sleep=sleeps.append) as client,
        pytest.raises(ImageError, match=f"invalid registry {re.escape(repr(registry))}"),
    ):
        resolve(image, client=client)
    assert client.stats["requests"] == 0  # refused before any request


def test_https_unless_loopback_or_insecure() -> None:
    client = RegistryClient(BuilderConfig(insecure_registries=("reg.internal:5000",)))
    with client:
        assert client._url(Reference.parse("ghcr.io/a/b"), "manifests", "x").startswith("https://")
        assert client._url(Reference.parse("reg.internal:5000/a"), "blobs", "x").startswith(
            "http://"
        )
        assert client._url(Reference.parse("localhost:5000/a"), "blobs", "x").startswith("http://")
        assert client._url(Reference.parse("127.0.0.1:5000/a"), "blobs", "x").startswith("http://")


def test_oci_layout_and_docker_archive_sources(tmp_path: Path) -> None:
    multi = im.multilayer_image()
    im.write_layout(tmp_path / "layout", {"v1": multi, "app": im.http_app_image()})
    with resolve(f"oci:{tmp_path / 'layout'}:v1") as img:
        assert img.manifest_digest == multi.digest
        extract_image(img, mk(tmp_path / "a"))
    check_multilayer_tree(tmp_path / "a")
    with pytest.raises(ImageError, match="no image tagged 'nope'"):
        resolve(f"oci:{tmp_path / 'layout'}:nope")
    with pytest.raises(ImageError, match="not an OCI image layout"):
        resolve(f"oci:{tmp_path}")
    im.write_docker_archive(tmp_path / "img.tar", multi)
    with resolve(f"docker-archive:{tmp_path / 'img.tar'}") as img:
        assert img.entrypoint == ["/app/main.sh"]
        assert img.manifest_digest == multi.doc()["config"]["digest"]
        extract_image(img, mk(tmp_path / "b"))
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    (tmp_path / "broken.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(ImageError, match="docker-archive"):
        resolve(f"docker-archive:{tmp_path / 'broken.tar'}")


@pytest.mark.parametrize("annotations", [1, "latest", ["org.opencontainers.image.ref.name"]])
def test_a_layout_entry_with_malformed_annotations_is_an_image_error(
    tmp_path: Path, annotations: object
) -> None:
    """index.json is outside input: an entry whose ``annotations`` is not an object made a
    tagged ``oci:PATH:tag`` lookup raise a raw AttributeError."""
    im.write_layout(tmp_path / "layout", {"v1": im.http_app_image()})
    index = json.loads((tmp_path / "layout/index.json").read_text())
    index["manifests"][0]["annotations"] = annotations
    (tmp_path / "layout/index.json").write_text(json.dumps(index))
    with pytest.raises(
        ImageError, match=r"index.json manifests\[0\]: annotations must be an object"
    ):
        resolve(f"oci:{tmp_path / 'layout'}:v1")


def test_token_cached_per_repository_scope(pushed: Pushed) -> None:
    reg = pushed.reg
    client = RegistryClient(credentials={reg.host: CREDS})
    with client:
        for repo, tag in (("test/multi", "latest"), ("test/app", "v1"), ("test/multi", "latest")):
            with resolve(reg.ref(repo, tag), client=client):
                pass
        assert client.stats["tokens"] == 2  # one per repository, reused on the second pull


@pytest.mark.parametrize("dest", ["oci", "docker-archive"])
def test_layouts_and_archives_written_by_skopeo(pushed: Pushed, tmp_path: Path, dest: str) -> None:
    """Interop: what a real tool writes (skopeo copy from the registry) is read by our sources."""
    target = (
        f"oci:{tmp_path / 'layout'}:v1"
        if dest == "oci"
        else f"docker-archive:{tmp_path / 'img.tar'}"
    )
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--src-creds", ":".join(CREDS),
         f"docker://{pushed.reg.ref('test/multi')}", target],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    with resolve(target) as img:
        assert img.entrypoint == ["/app/main.sh"]
        extract_image(img, mk(tmp_path / "root"))
    check_multilayer_tree(tmp_path / "root")


def test_basic_auth_registry(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A registry behind Basic auth (no token server): the client answers the Basic challenge."""
    with start_registry(tmp_path_factory.mktemp("anon")) as anon:
        multi = im.multilayer_image()
        im.push(anon.host, "test/multi", "latest", multi)
        basic = "Basic " + base64.b64encode(":".join(CREDS).encode()).decode()
        with _serve(ProxyState(upstream=anon.url, blobs={}, basic=basic)) as state:
            with pytest.raises(Unauthenticated, match="needs credentials"):
                resolve(f"{state.front}/test/multi:latest")
            client = RegistryClient(credentials={state.front: CREDS})
            with client, resolve(f"{state.front}/test/multi:latest", client=client) as img:
                extract_image(img, tmp_path)
            assert client.stats["challenges"] == 1 and client.stats["tokens"] == 0
            assert all(a == basic for p, a in state.front_seen[2:]), state.front_seen
    check_multilayer_tree(tmp_path)


@pytest.mark.parametrize("flip", [False, True])
def test_progress_reaches_the_blob_size_only_once_its_digest_is_verified(flip: bool) -> None:
    import hashlib

    from unkey_deploy.builder.oci import VerifiedStream

    data = os.urandom(3 << 20)
    sent = bytearray(data)
    if flip:
        sent[-1] ^= 1  # the last byte differs: the digest check at the end fails
    chunks = [bytes(sent[i : i + (1 << 20)]) for i in range(0, len(sent), 1 << 20)]
    seen: list[int] = []
    stream = VerifiedStream(iter(chunks), digest="sha256:" + hashlib.sha256(data).hexdigest(),
                            size=len(data), what="blob", progress=seen.append)  # fmt: skip
    if flip:
        with pytest.raises(ImageError, match="digest mismatch"):
            stream.drain()
        assert sum(seen) == 2 << 20  # the completing chunk was never reported
    else:
        stream.drain()
        assert seen == [1 << 20] * 3 and stream.verified
