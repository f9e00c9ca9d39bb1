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

    def wait(self, build_id: BuildId, /, timeout: float, on_log: Log | None = None) -> Build:
        """Block until the build finishes, passing each new log line to ``on_log``; raises
        DeadlineExceeded after ``timeout`` seconds."""
        ...

    def cancel(self, build_id: BuildId, /) -> Build: ...


# -- image source seam ---------------------------------------------------------------------------


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

    def extract(self, image: SourceImage, root: Path, log: Log, /) -> None:
        """Apply every layer into ``root`` (empty dir); raises LayerError/ImageError."""
        ...

    def release(self, image: SourceImage, /) -> None:
        """Free what ``resolve`` holds open (registry connection, archive file)."""
        ...
