"""builderd's interface: requests, build records, the ``Builder`` Protocol and the image-source
seam the pipeline pulls through."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import InvalidInput
from ..core.ids import AssetId, BuildId, CustomerId
from .vminit import ImageConfig, Overrides

Log = Callable[[str], None]
"""One human-readable build log line."""

PROGRESS_UNITS = frozenset({"bytes", "steps"})


@dataclass(frozen=True)
class BuildProgress:
    """How far one item of a build is: a layer's blob (``bytes``: pulled, verified and applied;
    the two happen in one stream) or the rootfs (``steps``: harden, ext4 image, zstd).

    A build emits each item's progress with ``done`` never going back, at a bounded rate, and
    always its final ``done == total``. ``detail`` names the current step (``steps`` items).
    """

    item: str
    done: int
    total: int
    unit: str = "bytes"
    detail: str = ""

    def __post_init__(self) -> None:
        if not self.item or len(self.item) > 200:
            raise InvalidInput("progress item must be 1-200 characters")
        if self.unit not in PROGRESS_UNITS:
            raise InvalidInput(f"progress unit must be one of {sorted(PROGRESS_UNITS)}")
        if not 0 <= self.done <= self.total:
            raise InvalidInput(f"progress of {self.item}: need 0 <= done <= total, "
                               f"got {self.done}/{self.total}")  # fmt: skip

    @property
    def finished(self) -> bool:
        return self.done == self.total

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"item": self.item, "done": self.done, "total": self.total,
                             "unit": self.unit}  # fmt: skip
        if self.detail:
            d["detail"] = self.detail
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BuildProgress:
        try:
            return cls(str(d["item"]), int(d["done"]), int(d["total"]), str(d.get("unit", "bytes")),
                       str(d.get("detail", "")))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"malformed build progress {dict(d)!r:.200}") from exc

    def render(self) -> str:
        """One log line, e.g. ``layer 1/2 sha256:0123456789ab…: 1.2/3.4 MB (35%)``."""
        pct = 100 * self.done // self.total if self.total else 100
        if self.unit == "bytes":
            amount = f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
        else:
            amount = f"step {self.done}/{self.total}"
        tail = f" {self.detail}" if self.detail else ""
        return f"{self.item}: {amount} ({pct}%){tail}"


OnProgress = Callable[[BuildProgress], None]
"""Receives structured build progress (see :class:`BuildProgress`)."""

PIPELINE_VERSION = 1
"""Bumped whenever the pipeline's output for the same input changes (part of the cache key)."""


@dataclass(frozen=True)
class BuildOptions:
    keep_shell: bool = False
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "keep_shell": self.keep_shell,
            "command": list(self.command) if self.command is not None else None,
            "args": list(self.args) if self.args is not None else None,
            "env": dict(sorted(self.env.items())),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BuildOptions:
        unknown = set(d) - {"keep_shell", "command", "args", "env"}
        if unknown:
            raise InvalidInput(f"unknown build options {sorted(unknown)}")
        cmd, args, env = d.get("command"), d.get("args"), d.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise InvalidInput("build option env must map strings to strings")
        for name, v in (("command", cmd), ("args", args)):
            if v is not None and (
                not isinstance(v, list) or not all(isinstance(x, str) for x in v)
            ):
                raise InvalidInput(f"build option {name} must be a list of strings")
        return cls(
            keep_shell=bool(d.get("keep_shell", False)),
            command=tuple(cmd) if cmd is not None else None,
            args=tuple(args) if args is not None else None,
            env=dict(env),
        )

    def overrides(self) -> Overrides:
        return Overrides(self.command, self.args, dict(self.env), self.keep_shell)

    def cache_key(self, manifest_digest: str, init_digest: str = "") -> str:
        """Manifest digest + options + pipeline version + the injected init's digest: equal
        keys build equal bytes. (Without the init's digest, a changed ``vminit.c`` would keep
        serving cached assets with the old init until someone bumped PIPELINE_VERSION.)"""
        blob = json.dumps(
            {"v": PIPELINE_VERSION, "o": self.as_dict(), "init": init_digest}, sort_keys=True
        )
        return f"{manifest_digest}|{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


@dataclass(frozen=True)
class BuildRequest:
    image: str
    customer_id: CustomerId
    options: BuildOptions = BuildOptions()
    priority: int = 0
    deployment_id: str | None = None


class BuildState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({BuildState.SUCCEEDED, BuildState.FAILED, BuildState.CANCELLED})


@dataclass(frozen=True)
class Build:
    build_id: BuildId
    state: BuildState
    image: str
    customer_id: CustomerId
    deployment_id: str | None
    asset_id: AssetId | None
    manifest_digest: str | None
    cached: bool
    error: dict[str, Any] | None  # core.errors wire form (code, message, ...)
    attempts: int
    log: tuple[str, ...]
    created_at: float
    updated_at: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["log"] = list(self.log)
        return d


class Builder(Protocol):
    """builderd."""

    def submit(self, req: BuildRequest, /) -> BuildId: ...

    def get(self, build_id: BuildId, /) -> Build:
        """The build with its log so far; raises NotFound."""
        ...

    def wait(
        self,
        build_id: BuildId,
        /,
        timeout: float,
        on_log: Log | None = None,
        on_progress: OnProgress | None = None,
    ) -> Build:
        """Block until the build finishes, passing each new log line to ``on_log`` and each
        progress record to ``on_progress``, in the order the build wrote them; raises
        DeadlineExceeded after ``timeout`` seconds."""
        ...

    def cancel(self, build_id: BuildId, /) -> Build: ...


# -- image source seam ---------------------------------------------------------------------------


# Image references naming files of the builder's own host: a builderd builds them only with
# builder.local_sources on (a builder serving customers must not read its host's files for them).
LOCAL_SOURCES = ("oci:", "docker-archive:")


@dataclass(frozen=True)
class SourceImage:
    """A resolved image: what the cache key and the launch spec need, plus the source's handle."""

    ref: str
    manifest_digest: str
    config: ImageConfig
    raw_config: dict[str, Any]
    handle: Any = None


class ImageSource(Protocol):
    def resolve(self, image: str, log: Log, /) -> SourceImage: ...

    def extract(
        self, image: SourceImage, root: Path, log: Log, /, progress: OnProgress | None = None
    ) -> None:
        """Apply every layer into ``root`` (empty dir); raises LayerError/ImageError.
        ``progress`` gets each layer's bytes (unthrottled: the caller bounds the rate)."""
        ...

    def release(self, image: SourceImage, /) -> None:
        """Free what ``resolve`` holds open (registry connection, archive file)."""
        ...
