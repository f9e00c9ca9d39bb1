"""OCI distribution client (pull side) on httpx: manifests, image indexes, verified blob streams.

Security contract (this module is the boundary between a registry and the build):

* Manifests are read with a size cap (``BuilderConfig.max_manifest_bytes``) and, when pulled by
  digest, verified against it. Only Docker v2 schema 2 and OCI media types are accepted; anything
  else is an :class:`ImageError` naming the media type.
* Blobs are streamed through :class:`VerifiedStream`: sha256 is computed while reading, reading
  stops with an error as soon as more bytes arrive than the descriptor says, and the digest and size
  are checked at end of stream. Nothing trusts ``Docker-Content-Digest``.
* Auth: anonymous, Basic, or the Bearer token flow (``WWW-Authenticate`` challenge -> token server
  -> token per repository scope, cached). Redirects are followed by hand so the Authorization
  header is never sent to another host (blob storage redirects to S3/CDN are common).
* Plain HTTP only for loopback registries and ``BuilderConfig.insecure_registries``.
* Connect errors, 5xx and 429 are retried with exponential backoff (``Retry-After`` honoured).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import idna

from ..core.config import BuilderConfig
from ..core.errors import ImageError, Unauthenticated

# Manifest media types.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))

# Config media types.
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# Layer media types -> expected compression ("gzip", "zstd" or "" for plain tar).
LAYER_TYPES: Mapping[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
}

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHUNK = 1 << 20


def short_digest(digest: str) -> str:
    """``sha256:0123456789ab…`` for messages (full digests go in error details)."""
    return digest[:19] + "…" if len(digest) > 19 else digest


def check_digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        raise ImageError(
            f"{what}: invalid or unsupported digest {value!r:.90} (want sha256:<64 hex>)"
        )
    return value


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob (media type, digest, size)."""

    media_type: str
    digest: str
    size: int
    platform: Mapping[str, Any] | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: object, what: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise ImageError(f"{what}: descriptor must be an object, got {type(raw).__name__}")
        mt = raw.get("mediaType")
        size = raw.get("size")
        if not isinstance(mt, str) or not mt:
            raise ImageError(f"{what}: descriptor has no mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(
                f"{what}: descriptor size must be a non-negative integer, got {size!r}"
            )
        plat = raw.get("platform")
        urls = raw.get("urls") or ()
        return cls(
            media_type=mt,
            digest=check_digest(raw.get("digest"), what),
            size=size,
            platform=plat if isinstance(plat, dict) else None,
            urls=tuple(str(u) for u in urls) if isinstance(urls, list) else (),
        )


@dataclass(frozen=True)
class Reference:
    """``[registry/]repository[:tag][@digest]``; Docker Hub rules for the registry default."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def ref(self) -> str:
        """What to put after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    @classmethod
    def parse(cls, text: str) -> Reference:
        s = text.strip()
        if s.startswith("docker://"):
            s = s[len("docker://") :]
        if not s or any(c.isspace() for c in s):
            raise ImageError(f"invalid image reference {text!r}")
        digest = None
        if "@" in s:
            s, digest = s.split("@", 1)
            check_digest(digest, f"image reference {text!r}")
        first, _, rest = s.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, path = first, rest
        else:
            registry, path = "docker.io", s
        tag = None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, tag = path.rsplit(":", 1)
        if not _valid_registry(registry):
            raise ImageError(f"invalid registry {registry!r} in image reference {text!r}")
        if registry == "docker.io":
            registry = "registry-1.docker.io"
            if "/" not in path:
                path = f"library/{path}"
        if not re.fullmatch(
            r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*", path
        ):
            raise ImageError(f"invalid repository name {path!r} in image reference {text!r}")
        if tag is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
            raise ImageError(f"invalid tag {tag!r} in image reference {text!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, path, tag, digest)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_REGISTRY_RE = re.compile(rf"(?:(?P<name>{_LABEL}(?:\.{_LABEL})*)|\[(?P<ip6>[0-9A-Fa-f:.]+)\])"
                          r"(?::(?P<port>[0-9]{1,5}))?")  # fmt: skip


def _valid_registry(registry: str) -> bool:
    """``host[:port]``: DNS labels (no empty, over-long or edge-hyphen label, no invalid
    ``xn--`` A-label), or a bracketed IPv6 address; port 1-65535."""
    m = _REGISTRY_RE.fullmatch(registry)
    if m is None or (m["port"] is not None and not 0 < int(m["port"]) < 65536):
        return False
    if m["ip6"] is not None:
        try:
            ipaddress.IPv6Address(m["ip6"])
        except ValueError:
            return False
        return True
    try:
        idna.encode(m["name"])  # what the connection will do with it (httpx uses idna)
    except (idna.IDNAError, UnicodeError):
        return False
    return True


def _is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _host_of(netloc: str) -> str:
    return urlsplit(f"//{netloc}").hostname or netloc


class VerifiedStream:
    """A read-only binary stream over chunks that checks size and sha256 while it is read.

    ``read()`` raises :class:`ImageError` as soon as the data exceeds ``size``; at end of data it
    raises if fewer bytes arrived or the digest differs. ``progress(n)`` is called with the
    number of bytes of each chunk read (for progress bars); the chunk that completes the blob is
    reported only once its digest has been verified, so the reported total reaches ``size`` only
    for a verified blob.
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        *,
        digest: str,
        size: int,
        what: str,
        progress: Callable[[int], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._chunks = chunks
        self._digest = digest
        self._size = size
        self._what = what
        self._hash = hashlib.sha256()
        # Unread data is self._buf[self._pos:] (an offset avoids re-copying the tail per read).
        self._buf = b""
        self._pos = 0
        self._seen = 0
        self._eof = False
        self._verified = False
        self._progress = progress
        self._held = 0  # bytes of the completing chunk, reported after verification
        self._on_close = on_close
        self.closed = False

    @property
    def bytes_read(self) -> int:
        return self._seen

    def readable(self) -> bool:
        return True

    def _pull(self) -> bool:
        if self._eof:
            return False
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._eof = True
            self._finish()
            return False
        except httpx.HTTPError as e:
            raise ImageError(
                f"{self._what}: transfer failed after {self._seen} bytes: {e}", retryable=True
            ) from e
        self._seen += len(chunk)
        if self._seen > self._size:
            raise ImageError(
                f"{self._what}: blob is larger than its descriptor says ({self._size} bytes); "
                f"stopped after {self._seen} bytes",
                details={"digest": self._digest},
            )
        self._hash.update(chunk)
        if self._progress is not None and chunk:
            if self._seen == self._size:
                self._held = len(chunk)
            else:
                self._progress(len(chunk))
        self._buf = self._buf[self._pos :] + chunk if self._pos < len(self._buf) else chunk
        self._pos = 0
        return True

    def _finish(self) -> None:
        if self._seen != self._size:
            raise ImageError(
                f"{self._what}: blob truncated: got {self._seen} of {self._size} bytes",
                details={"digest": self._digest},
            )
        got = "sha256:" + self._hash.hexdigest()
        if got != self._digest:
            raise ImageError(
                f"{self._what}: digest mismatch: expected {self._digest}, got {got}",
                details={"digest": self._digest, "actual": got},
            )
        self._verified = True
        if self._progress is not None and (self._held or not self._size):
            self._progress(self._held)  # an empty blob reports 0 of 0 once, when verified
            self._held = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self._buf[self._pos :]]
            self._buf, self._pos = b"", 0
            while self._pull():
                parts.append(self._buf)
                self._buf = b""
            return b"".join(parts)
        while len(self._buf) - self._pos < n and self._pull():
            pass
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read (and verify) whatever is left; raises if the blob is wrong."""
        self._buf, self._pos = b"", 0
        while self._pull():
            self._buf = b""

    @property
    def verified(self) -> bool:
        return self._verified

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> VerifiedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Challenge:
    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_www_authenticate(value: str) -> _Challenge:
    """Parse ``Bearer realm="...",service="...",scope="..."`` (or ``Basic realm=...``)."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_-]*)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))', rest):
        params[m.group(1).lower()] = m.group(2) if m.group(2) is not None else (m.group(3) or "")
    return _Challenge(scheme.lower(), params)


class RegistryClient:
    """Pull-side client for one or more registries (thread-unsafe; one per build).

    ``credentials`` maps a registry host (``host:port``) to ``(username, password)``.
    ``sleep`` is injected so tests of the retry policy need not wait.
    """

    def __init__(
        self,
        config: BuilderConfig | None = None,
        *,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        retries: int = 4,
        backoff_s: float = 0.25,
        max_backoff_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config or BuilderConfig()
        self._creds = dict(credentials or {})
        self._retries = retries
        self._backoff = backoff_s
        self._max_backoff = max_backoff_s
        self._sleep = sleep
        timeout = httpx.Timeout(self.config.registry_timeout_s, connect=10.0)
        # Digests and sizes are of the bytes as stored: no transfer encoding (httpx asks for
        # gzip/deflate/zstd by default, and a compressing proxy or CDN would then hand us
        # bytes whose digest is not the descriptor's).
        self._http = httpx.Client(timeout=timeout, follow_redirects=False, transport=transport,
                                  headers={"Accept-Encoding": "identity"})  # fmt: skip
        # Authorization header per (registry, repository) scope, set after a challenge.
        self._auth: dict[tuple[str, str], str] = {}
        # Counters tests and logs use: requests, 401 challenges, tokens fetched.
        self.stats = {"requests": 0, "challenges": 0, "tokens": 0, "retries": 0}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ----------------------------------------------------------------------------

    def _scheme(self, registry: str) -> str:
        if _is_loopback(_host_of(registry)) or registry in self.config.insecure_registries:
            return "http"
        return "https"

    def _url(self, ref: Reference, kind: str, what: str) -> str:
        return f"{self._scheme(ref.registry)}://{ref.registry}/v2/{ref.repository}/{kind}/{what}"

    def _send(self, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
        """One request with retries on connect errors, 5xx and 429 (response left open)."""
        attempt = 0
        while True:
            self.stats["requests"] += 1
            try:
                req = self._http.build_request(method, url, headers=headers)
                resp = self._http.send(req, stream=True)
            except (
                # refused, reset (ECONNRESET while waiting for the answer), timed out, or the
                # server hung up mid-answer: all worth another try
                httpx.NetworkError,
                httpx.TimeoutException,
                httpx.RemoteProtocolError,
            ) as e:
                if attempt >= self._retries:
                    raise ImageError(
                        f"registry unreachable: {method} {url}: {e}", retryable=True
                    ) from e
                delay = min(self._max_backoff, self._backoff * 2**attempt)
            else:
                if resp.status_code != 429 and resp.status_code < 500:
                    return resp
                resp.close()
                if attempt >= self._retries:
                    raise ImageError(
                        f"registry error: {method} {url} -> HTTP {resp.status_code} "
                        f"after {attempt + 1} attempts",
                        retryable=True,
                    )
                delay = min(self._max_backoff, self._backoff * 2**attempt)
                ra = resp.headers.get("retry-after")
                if ra is not None:
                    try:
                        delay = min(self._max_backoff, max(0.0, float(ra)))
                    except ValueError:
                        pass
            attempt += 1
            self.stats["retries"] += 1
            self._sleep(delay)

    def _request(self, ref: Reference, url: str, accept: str | None = None) -> httpx.Response:
        """GET with auth (challenges) and manual redirects; returns a 2xx streaming response."""
        # Scheme and host: a redirect from https://reg to http://reg (same netloc) must not
        # get the token either, or it would cross the network in clear text.
        origin = _origin(url)
        scope = (ref.registry, ref.repository)
        challenged = False
        redirects = 0
        while True:
            headers: dict[str, str] = {}
            if accept:
                headers["Accept"] = accept
            # Credentials only ever go to the registry's own host.
            if _origin(url) == origin and scope in self._auth:
                headers["Authorization"] = self._auth[scope]
            resp = self._send("GET", url, headers)
            if resp.status_code in (301, 302, 303, 307, 308):
                loc = resp.headers.get("location")
                resp.close()
                redirects += 1
                if not loc or redirects > 5:
                    raise ImageError(f"registry redirect loop or missing Location for {url}")
                try:
                    new = urljoin(url, loc)
                    scheme = urlsplit(new).scheme
                except ValueError as e:  # e.g. "http://[bad": not a URL at all
                    raise ImageError(f"registry redirected to an invalid URL {loc!r:.200}") from e
                if scheme not in ("http", "https"):
                    raise ImageError(f"registry redirected to an unsupported URL {new!r}")
                url = new
                continue
            if resp.status_code == 401 and not challenged and _origin(url) == origin:
                challenged = True
                self.stats["challenges"] += 1
                www = resp.headers.get("www-authenticate", "")
                resp.close()
                self._authenticate(ref, www)
                continue
            if resp.status_code == 401:
                resp.close()
                raise Unauthenticated(
                    f"registry {ref.registry} refused access to {ref.repository} (HTTP 401)",
                    suggestion="check the registry credentials",
                )
            if resp.status_code == 403:
                resp.close()
                raise ImageError(
                    f"registry {ref.registry} denied access to {ref.repository} (HTTP 403)"
                )
            if resp.status_code == 404:
                resp.close()
                raise ImageError(f"not found in registry: {url}")
            if resp.status_code >= 300:
                resp.close()
                raise ImageError(f"registry error: GET {url} -> HTTP {resp.status_code}")
            return resp

    def _creds_for(self, registry: str) -> tuple[str, str] | None:
        if registry in self._creds:
            return self._creds[registry]
        if registry == "registry-1.docker.io":  # people write Docker Hub credentials as docker.io
            for alias in ("docker.io", "index.docker.io"):
                if alias in self._creds:
                    return self._creds[alias]
        return None

    def _authenticate(self, ref: Reference, www: str) -> None:
        ch = parse_www_authenticate(www)
        creds = self._creds_for(ref.registry)
        if ch.scheme == "basic":
            if creds is None:
                raise Unauthenticated(f"registry {ref.registry} needs credentials (Basic auth)")
            self._auth[(ref.registry, ref.repository)] = _basic(creds)
            return
        if ch.scheme != "bearer" or "realm" not in ch.params:
            raise Unauthenticated(
                f"registry {ref.registry} sent an unsupported auth challenge {www!r:.120}"
            )
        realm = ch.params["realm"]
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https"):
            raise Unauthenticated(
                f"registry {ref.registry}: token realm {realm!r} is not an http(s) URL"
            )
        if (
            parts.scheme == "http"
            and creds is not None
            and not _is_loopback(parts.hostname or "")
            and parts.netloc not in self.config.insecure_registries
        ):
            raise Unauthenticated(
                f"refusing to send credentials to a plain-HTTP token realm {realm}"
            )
        query = {"scope": ch.params.get("scope") or f"repository:{ref.repository}:pull"}
        if "service" in ch.params:
            query["service"] = ch.params["service"]
        headers = {"Authorization": _basic(creds)} if creds else {}
        resp = self._send("GET", f"{realm}?{urlencode(query)}", headers)
        cap = self.config.max_manifest_bytes  # a token is a few KiB; the server is outside input
        try:
            buf = bytearray()
            for chunk in resp.iter_bytes():  # decoded: no digest here, and still capped
                buf += chunk
                if len(buf) > cap:
                    raise ImageError(f"token server {realm}: answer exceeds the {cap}-byte limit")
            body = bytes(buf)
        except httpx.HTTPError as e:
            raise ImageError(f"token server {realm}: transfer failed: {e}", retryable=True) from e
        finally:
            resp.close()
        if resp.status_code in (401, 403):
            raise Unauthenticated(
                f"token server {realm} refused the credentials for {ref.registry} "
                f"(HTTP {resp.status_code})"
            )
        if resp.status_code != 200:
            raise ImageError(f"token server {realm} answered HTTP {resp.status_code}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise ImageError(f"token server {realm} returned no token")
        self.stats["tokens"] += 1
        self._auth[(ref.registry, ref.repository)] = f"Bearer {token}"

    # -- API ----------------------------------------------------------------------------------

    def get_manifest(
        self, ref: Reference, reference: str | None = None, *, expect: Descriptor | None = None
    ) -> tuple[bytes, str, str]:
        """Fetch a manifest or index: ``(raw bytes, media type, digest)``.

        Size-capped by ``max_manifest_bytes``; verified when pulled by digest or ``expect``.
        """
        what = reference or ref.ref
        cap = self.config.max_manifest_bytes
        if expect is not None and expect.size > cap:
            raise ImageError(f"manifest {what} is {expect.size} bytes, over the {cap}-byte limit")
        resp = self._request(ref, self._url(ref, "manifests", what), ACCEPT)
        try:
            cl = resp.headers.get("content-length")
            if cl is not None and cl.isdigit() and int(cl) > cap:
                raise ImageError(
                    f"manifest {ref.repository}:{what} is {cl} bytes, over the {cap}-byte limit"
                )
            buf = bytearray()
            for chunk in resp.iter_raw():
                buf += chunk
                if len(buf) > cap:
                    raise ImageError(
                        f"manifest {ref.repository}:{what} exceeds the {cap}-byte limit"
                    )
            ctype = resp.headers.get("content-type", "").split(";")[0].strip()
        except httpx.HTTPError as e:
            raise ImageError(f"manifest {ref.repository}:{what}: transfer failed: {e}") from e
        finally:
            resp.close()
        raw = bytes(buf)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        want = (
            expect.digest if expect is not None else (what if what.startswith("sha256:") else None)
        )
        if want is not None and digest != want:
            raise ImageError(f"manifest {ref.repository}@{want}: digest mismatch (got {digest})")
        if expect is not None and len(raw) != expect.size:
            raise ImageError(
                f"manifest {ref.repository}@{expect.digest}: size {len(raw)} "
                f"!= descriptor size {expect.size}"
            )
        return raw, ctype, digest

    def open_blob(
        self,
        ref: Reference,
        desc: Descriptor,
        *,
        max_bytes: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> VerifiedStream:
        """Open a blob as a :class:`VerifiedStream` (close it when done)."""
        what = f"blob {short_digest(desc.digest)}"
        if max_bytes is not None and desc.size > max_bytes:
            raise ImageError(
                f"{what} is {desc.size} bytes, over the {max_bytes}-byte limit",
                details={"digest": desc.digest},
            )
        resp = self._request(ref, self._url(ref, "blobs", desc.digest))
        cl = resp.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > desc.size:
            resp.close()
            raise ImageError(
                f"{what}: server announces {cl} bytes but the descriptor says {desc.size}",
                details={"digest": desc.digest},
            )
        return VerifiedStream(
            resp.iter_raw(_CHUNK),
            digest=desc.digest,
            size=desc.size,
            what=what,
            progress=progress,
            on_close=resp.close,
        )

    def read_blob(self, ref: Reference, desc: Descriptor, max_bytes: int) -> bytes:
        """A small blob (image config) fully read and verified."""
        with self.open_blob(ref, desc, max_bytes=max_bytes) as s:
            return s.read()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
