"""One error tree for the whole platform.

Every error has a stable ``code`` (part of the API), whether it is ``retryable``, the HTTP status
the gateway maps it to, the exit code the CLI exits with, and an optional ``suggestion`` telling a
person what to do next. Only the gateway maps errors to HTTP; only the CLI renders them for people;
only queue consumers map ``retryable`` to ack/nak.

    UnkeyError                      code=internal         500  exit 1
    ├── InvalidInput                code=invalid_input    422  exit 2
    │   └── ValidationFailed        code=validation_failed 422 exit 2   (carries .problems)
    ├── Unauthenticated             code=unauthenticated  401  exit 3
    ├── Forbidden                   code=forbidden        403  exit 3
    ├── NotFound                    code=not_found        404  exit 4
    ├── Conflict                    code=conflict         409  exit 5
    │   └── IllegalTransition       code=illegal_transition 409 exit 5
    ├── RateLimited                 code=rate_limited     429  exit 6  (retryable, .retry_after)
    ├── Unavailable                 code=unavailable      503  exit 7  (retryable)
    ├── DeadlineExceeded            code=deadline_exceeded 504 exit 8  (retryable)
    ├── ResourceExhausted           code=resource_exhausted 507 exit 9 (disk full, capacity)
    ├── BuildFailed                 code=build_failed     422  exit 10
    │   ├── ImageError              code=image_error      (registry, manifest, digest problems)
    │   └── LayerError              code=layer_error      (hostile or broken layer entries)
    └── VmError                     code=vm_error         500  exit 11
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where (a dotted path, and line/column for files) and what."""

    loc: str
    msg: str
    line: int | None = None
    column: int | None = None

    def render(self, source: str | None = None) -> str:
        where = self.loc or "(root)"
        if self.line is not None:
            prefix = f"{source}:" if source else ""
            return f"{prefix}{self.line}:{self.column or 1}: {where}: {self.msg}"
        return f"{where}: {self.msg}"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"loc": self.loc, "msg": self.msg}
        if self.line is not None:
            d["line"] = self.line
            d["column"] = self.column
        return d


class UnkeyError(Exception):
    """Root of every error the platform raises on purpose."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        suggestion: str | None = None,
        retryable: bool | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.suggestion = suggestion
        self.retryable = self.default_retryable if retryable is None else retryable
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.suggestion:
            body["suggestion"] = self.suggestion
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(UnkeyError):
    code = "invalid_input"
    http_status = 422
    exit_code = 2


class ValidationFailed(InvalidInput):
    """An input failed validation; ``problems`` names every field that was wrong."""

    code = "validation_failed"

    def __init__(self, message: str, problems: list[Problem], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.problems = problems

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["problems"] = [p.as_dict() for p in self.problems]
        return body


class Unauthenticated(UnkeyError):
    code = "unauthenticated"
    http_status = 401
    exit_code = 3


class Forbidden(UnkeyError):
    code = "forbidden"
    http_status = 403
    exit_code = 3


class NotFound(UnkeyError):
    code = "not_found"
    http_status = 404
    exit_code = 4


class Conflict(UnkeyError):
    code = "conflict"
    http_status = 409
    exit_code = 5


class IllegalTransition(Conflict):
    """A lifecycle action that is not legal in the object's current state."""

    code = "illegal_transition"


class RateLimited(UnkeyError):
    code = "rate_limited"
    http_status = 429
    exit_code = 6
    default_retryable = True

    def __init__(self, message: str, *, retry_after: float, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unavailable(UnkeyError):
    code = "unavailable"
    http_status = 503
    exit_code = 7
    default_retryable = True


class DeadlineExceeded(UnkeyError):
    code = "deadline_exceeded"
    http_status = 504
    exit_code = 8
    default_retryable = True


class ResourceExhausted(UnkeyError):
    code = "resource_exhausted"
    http_status = 507
    exit_code = 9
    default_retryable = True


class BuildFailed(UnkeyError):
    code = "build_failed"
    http_status = 422
    exit_code = 10


class ImageError(BuildFailed):
    code = "image_error"


class LayerError(BuildFailed):
    """A layer entry that is hostile or broken; names the layer digest and the entry."""

    code = "layer_error"


class VmError(UnkeyError):
    code = "vm_error"
    http_status = 500
    exit_code = 11


ALL_ERRORS: tuple[type[UnkeyError], ...] = (
    UnkeyError,
    InvalidInput,
    ValidationFailed,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    IllegalTransition,
    RateLimited,
    Unavailable,
    DeadlineExceeded,
    ResourceExhausted,
    BuildFailed,
    ImageError,
    LayerError,
    VmError,
)

_BY_CODE = {cls.code: cls for cls in ALL_ERRORS}


def from_dict(body: dict[str, Any]) -> UnkeyError:
    """Rebuild an error from its wire form (the ``error`` object of an API response)."""
    cls = _BY_CODE.get(str(body.get("code", "")), UnkeyError)
    message = str(body.get("message", "unknown error"))
    kw: dict[str, Any] = {
        "suggestion": body.get("suggestion"),
        "retryable": body.get("retryable"),
        "details": body.get("details"),
    }
    if cls is ValidationFailed:
        problems = [
            Problem(
                loc=str(p.get("loc", "")),
                msg=str(p.get("msg", "")),
                line=p.get("line"),
                column=p.get("column"),
            )
            for p in body.get("problems", [])
        ]
        return ValidationFailed(message, problems, **kw)
    if cls is RateLimited:
        return RateLimited(message, retry_after=float(body.get("retry_after", 1)), **kw)
    return cls(message, **kw)
