"""Content-addressed blob stores: local filesystem (default) and S3 (boto3)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlparse

from ..core.errors import InvalidInput, NotFound, Unavailable

CHUNK = 1 << 20


def check_sha(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise InvalidInput(f"{sha256!r} is not a sha256 hex digest")
    return sha256


class BlobStore(Protocol):
    def put(self, path: Path, sha256: str, /) -> None:
        """Store ``path`` under ``sha256`` (no-op when present). The caller computed the digest."""
        ...

    def exists(self, sha256: str, /) -> bool: ...

    def open(self, sha256: str, /) -> contextlib.AbstractContextManager[IO[bytes]]: ...

    def download(self, sha256: str, dest: Path, /) -> None: ...

    def delete(self, sha256: str, /) -> None: ...

    def list(self) -> Iterator[tuple[str, float, int]]:
        """Every stored blob: (sha256, modified time, size)."""
        ...

    def local_path(self, sha256: str, /) -> Path | None:
        """The blob's own path when it is on this machine's filesystem."""
        ...


class FsBlobStore:
    """``<root>/sha256/<ab>/<abcdef...>``; writes go to a temp file then ``rename`` (atomic)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        check_sha(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def put(self, path: Path, sha256: str) -> None:
        dst = self._path(sha256)
        if dst.exists():
            return
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".put-")
        except OSError as exc:
            raise self._write_error(exc) from exc
        os.close(fd)
        try:
            try:
                os.link(path, tmp + ".l")  # same filesystem: no copy
                Path(tmp + ".l").replace(tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            Path(tmp).chmod(0o444)
            Path(tmp).replace(dst)
        except OSError as exc:  # disk full, quota, read-only: the temp file goes, nothing half
            raise self._write_error(exc) from exc
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _write_error(self, exc: OSError) -> Unavailable:
        return Unavailable(
            f"asset store {self.root}: cannot write a blob: {exc.strerror or exc}",
            suggestion="free space (or fix permissions) on that filesystem, then build again",
        )

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    @contextlib.contextmanager
    def open(self, sha256: str) -> Iterator[IO[bytes]]:
        try:
            f = self._path(sha256).open("rb")
        except FileNotFoundError as exc:
            raise NotFound(f"blob sha256:{sha256} is missing from {self.root}") from exc
        with f:
            yield f

    def download(self, sha256: str, dest: Path) -> None:
        with self.open(sha256) as f, dest.open("wb") as out:
            shutil.copyfileobj(f, out, CHUNK)

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def list(self) -> Iterator[tuple[str, float, int]]:
        for sub in sorted((self.root / "sha256").iterdir()):
            if not sub.is_dir():
                continue
            for p in sorted(sub.iterdir()):
                if len(p.name) == 64 and not p.name.startswith("."):
                    try:
                        st = p.stat()
                    except FileNotFoundError:  # deleted meanwhile (another gc): not stored
                        continue
                    yield p.name, st.st_mtime, st.st_size

    def local_path(self, sha256: str) -> Path | None:
        p = self._path(sha256)
        return p if p.exists() else None


class S3BlobStore:
    """``s3://bucket/prefix`` -> objects ``<prefix>/sha256/<digest>``."""

    def __init__(self, url: str, *, endpoint_url: str | None, region: str, client: Any = None):
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise InvalidInput(f"blob url {url!r} is not s3://bucket[/prefix]")
        self.bucket = u.netloc
        self.prefix = u.path.strip("/")
        if client is None:
            import boto3  # noqa: PLC0415 (only needed for S3)

            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        self.s3 = client

    def _key(self, sha256: str) -> str:
        check_sha(sha256)
        return f"{self.prefix}/sha256/{sha256}" if self.prefix else f"sha256/{sha256}"

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        from boto3.exceptions import S3UploadFailedError  # noqa: PLC0415
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            return fn(*args, **kw)
        except S3UploadFailedError as exc:  # upload_file wraps the ClientError in its own
            raise Unavailable(f"{what}: S3 error: {exc}") from exc
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise NotFound(f"{what}: not found in s3://{self.bucket}") from exc
            raise Unavailable(f"{what}: S3 error {code}: {exc}") from exc
        except BotoCoreError as exc:
            raise Unavailable(f"{what}: {exc}") from exc

    def put(self, path: Path, sha256: str) -> None:
        if self.exists(sha256):
            return
        # sha256 metadata: a reader can check the object without trusting the key alone
        self._call(f"upload {sha256}", self.s3.upload_file, str(path), self.bucket,
                   self._key(sha256), ExtraArgs={"Metadata": {"sha256": sha256}})  # fmt: skip

    def exists(self, sha256: str) -> bool:
        try:
            self._call(f"head {sha256}", self.s3.head_object, Bucket=self.bucket,
                       Key=self._key(sha256))  # fmt: skip
        except NotFound:
            return False
        return True

    @contextlib.contextmanager
    def open(self, sha256: str) -> Iterator[IO[bytes]]:
        obj = self._call(f"get {sha256}", self.s3.get_object, Bucket=self.bucket,
                         Key=self._key(sha256))  # fmt: skip
        body = obj["Body"]
        try:
            yield body
        finally:
            body.close()

    def download(self, sha256: str, dest: Path) -> None:
        self._call(f"download {sha256}", self.s3.download_file, self.bucket, self._key(sha256),
                   str(dest))  # fmt: skip

    def delete(self, sha256: str) -> None:
        self._call(f"delete {sha256}", self.s3.delete_object, Bucket=self.bucket,
                   Key=self._key(sha256))  # fmt: skip

    def list(self) -> Iterator[tuple[str, float, int]]:
        pages = iter(
            self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key("0" * 64)[:-64]
            )
        )
        # each page is one request: through _call, so a refusal is Unavailable like elsewhere
        while (page := self._call(f"list s3://{self.bucket}/{self.prefix}", next, pages,
                                  None)) is not None:  # fmt: skip
            for obj in page.get("Contents", []):
                name = str(obj["Key"]).rsplit("/", 1)[-1]
                if len(name) == 64:
                    yield name, obj["LastModified"].timestamp(), int(obj["Size"])

    def local_path(self, sha256: str) -> Path | None:
        return None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def open_blob_store(
    url: str | None, data_dir: Path, *, endpoint_url: str | None = None, region: str = "us-east-1"
) -> BlobStore:
    """``None``/``file:///path`` -> local FS (default ``<data_dir>/assets/blobs``), ``s3://``."""
    if url is None:
        return FsBlobStore(Path(data_dir) / "assets" / "blobs")
    u = urlparse(url)
    if u.scheme == "file":
        # file://blobs/x is host "blobs", path "/x": only an absolute path names a directory
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise InvalidInput(
                f"blob url {url!r} is not a local directory: use file:///absolute/path"
            )
        return FsBlobStore(Path(u.path))
    if u.scheme == "s3":
        return S3BlobStore(url, endpoint_url=endpoint_url, region=region)
    raise InvalidInput(f"unsupported blob url {url!r}: use file:///path or s3://bucket/prefix")
