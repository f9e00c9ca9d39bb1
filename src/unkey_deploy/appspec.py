"""The ``app.yaml`` schema and its loader: one model for the CLI and the gateway.

:class:`AppSpec` is the pydantic model of an app (the gateway validates ``POST /v1/deploy`` bodies
with it, and it is the schema in the OpenAPI spec). :func:`load_file` / :func:`load_text` parse
YAML into it so that **every** problem carries the line and column it was found at: the YAML is
composed into nodes (``yaml.compose``), turned into plain values while remembering each value's
mark, then validated; validation errors are mapped back to the marks.

The loader refuses what a hostile or broken file can do to a parser: files over
:data:`MAX_FILE_BYTES`, bytes that are not UTF-8, anchors and aliases (billion-laughs), duplicate
keys, non-string keys, tags, and roots that are not a mapping.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from .core.errors import Problem, ValidationFailed

MAX_FILE_BYTES = 256 * 1024
MAX_ENV_VARS = 256
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_ENV_TOTAL_BYTES = 128 * 1024
MAX_LABELS = 64
MAX_ARGV = 256
MAX_REPLICAS = 20
MAX_DEPTH = 32  # nesting levels of mappings/lists in a file
MIN_MEMORY = 64 * 1024**2
MAX_MEMORY = 64 * 1024**3
MIN_DISK = 64 * 1024**2
MAX_DISK = 1024 * 1024**3

_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_KEY_RE = re.compile(
    r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
)
_REGION_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")

# The distribution/reference grammar (docker, OCI): [domain[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}"
_REFERENCE_RE = re.compile(
    rf"^(?P<name>(?:(?P<domain>{_DOMAIN})/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)
_OCI_LAYOUT_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


def parse_size(value: str | int, *, what: str = "size") -> int:
    """``"512MiB"`` -> 536870912, ``"2GB"`` -> 2000000000; an int is a byte count.

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) powers of
    1024, exactly; fractions must come to a whole number of bytes. A bare number needs a unit.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a string like '512MiB' or '2GB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} must not be negative")
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"{what} {value!r} is not a size like '512MiB', '2GB' or '1.5GiB'")
    number, unit = m.groups()
    if not unit:
        raise ValueError(f"{what} {value!r} needs a unit (e.g. '{number}MiB' or '{number}MB')")
    if unit not in _UNITS:
        units = ", ".join(_UNITS)
        raise ValueError(f"unknown unit {unit!r} in {value!r}; use one of {units}")
    try:
        amount = Decimal(number) * _UNITS[unit]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only digits
        raise ValueError(f"{what} {value!r} is not a number") from exc
    if amount != amount.to_integral_value():
        raise ValueError(f"{what} {value!r} is not a whole number of bytes")
    return int(amount)


def _fmt_bytes(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n}B"


def check_image_reference(ref: str) -> str:
    """Return ``ref`` if it is a valid image reference, else raise ValueError saying why.

    Accepted: ``[registry[:port]/]repo[:tag][@sha256:<64 hex>]``, ``oci:PATH[:tag]`` (an OCI
    image layout directory) and ``docker-archive:PATH`` (a ``docker save`` tarball).
    """
    if not ref or ref != ref.strip():
        raise ValueError("image must be a non-empty reference without surrounding spaces")
    if len(ref) > 1024:
        raise ValueError("image reference is longer than 1024 characters")
    if any(c.isspace() or ord(c) < 32 for c in ref):
        raise ValueError(f"image reference {ref!r} contains whitespace or control characters")
    if ref.startswith("oci:"):
        rest = ref[4:]
        path, _, tag = rest.partition(":") if ":" in rest else (rest, "", "")
        if not path:
            raise ValueError("oci: needs a path to an OCI image layout, e.g. oci:./build/app:v1")
        if tag and not _OCI_LAYOUT_TAG_RE.match(tag):
            raise ValueError(f"invalid tag {tag!r} in {ref!r}")
        return ref
    if ref.startswith("docker-archive:"):
        if not ref[len("docker-archive:") :]:
            raise ValueError("docker-archive: needs a path to a tarball made by `docker save`")
        return ref
    if "://" in ref:
        raise ValueError(
            f"{ref!r} looks like a URL; write registry/repo:tag without a scheme "
            "(e.g. ghcr.io/acme/app:1.0)"
        )
    m = _REFERENCE_RE.match(ref)
    if not m:
        if "@" in ref and not re.search(rf"@(?:{_DIGEST})$", ref):
            raise ValueError(f"invalid digest in {ref!r}: expected @sha256:<64 lowercase hex>")
        if any(c.isupper() for c in ref.rsplit("/", maxsplit=1)[-1].split(":", maxsplit=1)[0]):
            raise ValueError(f"invalid image reference {ref!r}: repository names are lowercase")
        raise ValueError(
            f"invalid image reference {ref!r}: expected [registry/]repo[:tag][@sha256:digest]"
        )
    domain = m.group("domain")
    if (
        domain
        and not any(c in domain for c in ".:[")
        and domain != "localhost"
        and not re.fullmatch(_COMPONENT, domain)
    ):
        # Without '.', ':' or 'localhost' the first part is a path component, which is lowercase.
        raise ValueError(f"invalid image reference {ref!r}: repository names are lowercase")
    if len(m.group("name")) > 255:
        raise ValueError("image repository name is longer than 255 characters")
    return ref


def _no_nul(v: str) -> str:
    # each argument is NUL-terminated in the guest's /.vminit/argv: a NUL would split it, and
    # the build refuses it, but only after the image was pulled
    if "\0" in v:
        raise ValueError("contains a NUL byte")
    return v


Argv = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=4096), AfterValidator(_no_nul)]],
    Field(min_length=1, max_length=MAX_ARGV),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Resources(_Model):
    """What one replica gets: vCPUs, memory and (optionally) root disk size."""

    cpu: int = Field(description="vCPUs per replica (1..32)", ge=1, le=32)
    memory: str | int = Field(
        description="memory per replica: '512MiB', '2GB', '1.5GiB' (64MiB..64GiB) or bytes"
    )
    disk: str | int | None = Field(
        None, description="root filesystem size (64MiB..1TiB); default: the image size plus slack"
    )

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | int) -> str | int:
        n = parse_size(v, what="memory")
        if not MIN_MEMORY <= n <= MAX_MEMORY:
            raise ValueError(
                f"memory {v!r} ({n} bytes) is outside "
                f"{_fmt_bytes(MIN_MEMORY)}..{_fmt_bytes(MAX_MEMORY)}"
            )
        return v

    @field_validator("disk")
    @classmethod
    def _disk(cls, v: str | int | None) -> str | int | None:
        if v is None:
            return v
        n = parse_size(v, what="disk")
        if not MIN_DISK <= n <= MAX_DISK:
            raise ValueError(
                f"disk {v!r} ({n} bytes) is outside {_fmt_bytes(MIN_DISK)}..{_fmt_bytes(MAX_DISK)}"
            )
        return v

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory)

    @property
    def disk_bytes(self) -> int | None:
        return None if self.disk is None else parse_size(self.disk)


class HealthCheck(_Model):
    """HTTP health check: the replica is ready when ``GET path`` on ``port`` answers 2xx/3xx."""

    path: str = Field("/", description="HTTP path probed", max_length=1024)
    port: int | None = Field(None, ge=1, le=65535, description="default: the app's port")
    interval_s: float = Field(10.0, ge=1, le=300, description="seconds between probes")
    timeout_s: float = Field(2.0, gt=0, le=60, description="seconds before a probe fails")
    healthy_threshold: int = Field(1, ge=1, le=10)
    unhealthy_threshold: int = Field(3, ge=1, le=10)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or any(c.isspace() for c in v):
            raise ValueError(f"path {v!r} must start with '/' and contain no spaces")
        return v


class AppSpec(_Model):
    """One app: an image, how big each replica is, and how to run it."""

    name: str = Field(description="DNS label: lowercase letters, digits, '-'; 1..63 characters")
    image: str = Field(
        description="[registry/]repo[:tag][@sha256:digest], oci:PATH[:tag] or docker-archive:PATH"
    )
    resources: Resources
    port: int | None = Field(None, ge=1, le=65535, description="TCP port the app listens on")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables")
    command: Argv | None = Field(None, description="replaces the image's ENTRYPOINT")
    args: Argv | None = Field(None, description="replaces the image's CMD")
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    healthcheck: HealthCheck | None = None
    keep_shell: bool = Field(
        False,
        description="keep /bin/sh and friends in the rootfs "
        "(removed unless the entrypoint needs one)",
    )
    labels: dict[str, str] = Field(default_factory=dict)
    region: str | None = Field(None, description="preferred region (default: any)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DNS_LABEL_RE.match(v):
            raise ValueError(
                f"{v!r} is not a DNS label: 1..63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        return check_image_reference(v)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_ENV_VARS:
            raise ValueError(f"{len(v)} variables; at most {MAX_ENV_VARS} are allowed")
        total = 0
        for name, value in v.items():
            if not _ENV_NAME_RE.match(name):
                raise ValueError(
                    f"{name!r} is not a valid variable name (letters, digits, '_'; not starting "
                    "with a digit)"
                )
            size = len(value.encode())
            if size > MAX_ENV_VALUE_BYTES:
                raise ValueError(f"{name} is {size} bytes; at most {MAX_ENV_VALUE_BYTES} per value")
            if "\0" in value:
                raise ValueError(f"{name} contains a NUL byte")
            total += size + len(name)
        if total > MAX_ENV_TOTAL_BYTES:
            raise ValueError(f"environment is {total} bytes; at most {MAX_ENV_TOTAL_BYTES}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_LABELS:
            raise ValueError(f"{len(v)} labels; at most {MAX_LABELS} are allowed")
        for key, value in v.items():
            if not _LABEL_KEY_RE.match(key):
                raise ValueError(f"{key!r} is not a valid label key")
            if len(value) > 256:
                raise ValueError(f"label {key!r} value is longer than 256 characters")
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and not _REGION_RE.match(v):
            raise ValueError(f"{v!r} is not a region name (lowercase letters, digits, '-')")
        return v

    @property
    def memory_bytes(self) -> int:
        return self.resources.memory_bytes


# --- YAML loading with marks -------------------------------------------------------------------

Loc = tuple[str | int, ...]
Marks = dict[Loc, tuple[int, int]]


class _Refused(Exception):
    def __init__(self, msg: str, mark: Any, loc: Loc = ()) -> None:
        super().__init__(msg)
        self.msg = msg
        self.mark = mark
        self.loc = loc


def _pos(mark: Any) -> tuple[int, int]:
    if mark is None:
        return (1, 1)
    return (mark.line + 1, mark.column + 1)


def _loc_str(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_SCALAR_LOADER = yaml.SafeLoader("")


def _scalar(node: yaml.ScalarNode) -> Any:
    tag = node.tag
    if tag not in {
        "tag:yaml.org,2002:str",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:null",
    }:
        # Timestamps (the only other tag _to_python lets through): keep the text.
        return node.value
    return _SCALAR_LOADER.construct_object(node, deep=False)


_CORE_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}"
    for t in ("str", "int", "float", "bool", "null", "timestamp", "seq", "map")
)


def _refuse_surprising_number(node: yaml.ScalarNode, value: Any, loc: Loc) -> None:
    """YAML 1.1 (PyYAML) reads a leading zero as octal and ``a:b`` as base 60: ``replicas: 010``
    would be 8 replicas, without a word."""
    if node.tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        return
    digits = node.value.replace("_", "").lstrip("+-")
    if ":" in digits:
        kind = "a base-60"
    elif node.tag.endswith(":int") and re.fullmatch(r"0[0-7]+", digits):
        kind = "an octal"
    else:
        return
    raise _Refused(
        f"{node.value} is {kind} number in YAML ({value}); write it in decimal, or quote it",
        node.start_mark,
        loc,
    )


def _to_python(node: yaml.Node, loc: Loc, marks: Marks, seen: set[int]) -> Any:
    if id(node) in seen:
        raise _Refused("anchors and aliases are not allowed", node.start_mark, loc)
    seen.add(id(node))
    if node.tag not in _CORE_TAGS:
        # `!vault prod/token` would otherwise deploy the text "prod/token"
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise _Refused(f"tags ({tag}) are not allowed", node.start_mark, loc)
    marks[loc] = _pos(node.start_mark)
    if isinstance(node, yaml.ScalarNode):
        value = _scalar(node)
        _refuse_surprising_number(node, value, loc)
        return value
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(child, (*loc, i), marks, seen) for i, child in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused("merge keys (<<) are not allowed", key_node.start_mark, loc)
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Refused("keys must be plain strings", key_node.start_mark, loc)
            key = key_node.value
            if key in out:
                line, _col = marks[(*loc, key)]
                raise _Refused(
                    f"duplicate key {key!r} (first defined on line {line})",
                    key_node.start_mark,
                    (*loc, key),
                )
            out[key] = _to_python(value_node, (*loc, key), marks, seen)
            # Errors about a value point at the value; unknown-key errors at the key.
            marks[(*loc, key, "__key__")] = _pos(key_node.start_mark)
        return out
    raise _Refused("unsupported YAML node", node.start_mark, loc)  # pragma: no cover


def _reject_aliases(text: str) -> None:
    """Refuse anchors/aliases before composing, so a bomb never gets expanded anywhere.

    Also refuses nesting deeper than ``MAX_DEPTH``: PyYAML's composer recurses per level, so a
    deep document would otherwise end in RecursionError (and the scanner slows down badly).
    """
    depth = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", ev.start_mark)
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1
        if isinstance(ev, yaml.AliasEvent):
            raise _Refused("anchors and aliases are not allowed", ev.start_mark)
        anchor = getattr(ev, "anchor", None)
        if anchor is not None:
            raise _Refused(f"anchors (&{anchor}) are not allowed", ev.start_mark)


def _friendly(kind: str, msg: str, err: Any) -> str:
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "string_type":
        return f'must be a string, got {got!r} (quote numbers and booleans, e.g. "8080")'
    if kind in ("int_type", "int_from_float"):
        return f"must be a whole number, got {got!r}"
    if kind == "bool_type":
        return f"must be true or false, got {got!r}"
    if kind in ("float_type",):
        return f"must be a number, got {got!r}"
    if kind in ("dict_type", "model_type"):
        return f"must be a mapping, got {type(got).__name__}"
    if kind == "list_type":
        return f"must be a list of strings, got {type(got).__name__}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}, got {got!r}"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}, got {got!r}"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}, got {got!r}"
    return msg


def _problem_from_pydantic(err: Any, marks: Marks) -> Problem:
    loc: Loc = tuple(err["loc"])
    msg: str = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = f"unknown field {loc[-1]!r}"
        pos = marks.get((*loc, "__key__")) or marks.get(loc)
    elif kind == "missing":
        msg = "is required"
        pos = None
    else:
        msg = _friendly(kind, msg, err)
        pos = None
    if pos is None:
        probe = loc
        while probe and probe not in marks:
            probe = probe[:-1]
        pos = marks.get(probe, (1, 1))
    # For a dict-level validator (env, labels) point at the offending entry when we can name it.
    if kind == "value_error" and loc and loc[-1] in ("env", "labels"):
        m = re.match(r"^'?([^' ]+)'?", msg)
        if m and (*loc, m.group(1)) in marks:
            pos = marks[(*loc, m.group(1), "__key__")]
    return Problem(loc=_loc_str(loc), msg=msg, line=pos[0], column=pos[1])


def validate_data(data: Any, marks: Marks | None = None) -> AppSpec:
    """Validate plain data (parsed YAML or JSON); raise ValidationFailed naming every problem."""
    marks = marks or {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else type(data).__name__
        line, col = marks.get((), (1, 1))
        raise ValidationFailed(
            "invalid app spec",
            [
                Problem(
                    loc="",
                    msg=f"the document must be a mapping of fields, not {kind}",
                    line=line,
                    column=col,
                )
            ],
        )
    try:
        return AppSpec.model_validate(data)
    except ValidationError as exc:
        problems = [_problem_from_pydantic(e, marks) for e in exc.errors()]
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        raise ValidationFailed(
            f"invalid app spec: {len(problems)} problem(s)",
            problems,
            suggestion="fix the fields named above; `unkey validate FILE` checks a file offline",
        ) from None


def load_bytes(raw: bytes) -> AppSpec:
    """Parse and validate an app.yaml given as bytes."""
    if len(raw) > MAX_FILE_BYTES:
        raise ValidationFailed(
            "invalid app spec",
            [
                Problem(
                    loc="",
                    msg=f"file is {len(raw)} bytes; the limit is {MAX_FILE_BYTES} bytes",
                    line=1,
                    column=1,
                )
            ],
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        raise ValidationFailed(
            "invalid app spec",
            [
                Problem(
                    loc="",
                    msg=f"not UTF-8: invalid byte 0x{raw[exc.start]:02x}",
                    line=line,
                    column=col,
                )
            ],
        ) from None
    return load_text(text)


def load_text(text: str) -> AppSpec:
    """Parse and validate an app.yaml given as text."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip() or all(
        not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()
    ):
        raise ValidationFailed(
            "invalid app spec",
            [
                Problem(
                    loc="",
                    msg="file is empty; expected at least name, image and resources",
                    line=1,
                    column=1,
                )
            ],
        )
    marks: Marks = {}
    try:
        _reject_aliases(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            raise _Refused("file has no document", None)
        data = _to_python(node, (), marks, set())
    except _Refused as exc:
        line, col = _pos(exc.mark)
        raise ValidationFailed(
            "invalid app spec", [Problem(loc=_loc_str(exc.loc), msg=exc.msg, line=line, column=col)]
        ) from None
    except yaml.MarkedYAMLError as exc:
        line, col = _pos(exc.problem_mark or exc.context_mark)
        msg = "YAML syntax error: " + " ".join(s for s in (exc.context, exc.problem) if s)
        raise ValidationFailed(
            "invalid app spec", [Problem(loc="", msg=msg, line=line, column=col)]
        ) from None
    except yaml.YAMLError as exc:
        line, col = _pos(getattr(exc, "problem_mark", None))
        raise ValidationFailed(
            "invalid app spec", [Problem(loc="", msg=f"YAML error: {exc}", line=line, column=col)]
        ) from None
    return validate_data(data, marks)


def load_file(path: Path) -> AppSpec:
    """Read and validate ``path``; the size cap is checked before reading the whole file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
            if len(raw) > MAX_FILE_BYTES:
                fh.seek(0, 2)
                raw_len = fh.tell()
                raise ValidationFailed(
                    "invalid app spec",
                    [
                        Problem(
                            loc="",
                            msg=f"file is {raw_len} bytes; the limit is {MAX_FILE_BYTES} bytes",
                            line=1,
                            column=1,
                        )
                    ],
                )
    except OSError as exc:
        raise ValidationFailed(
            f"cannot read {path}", [Problem(loc="", msg=exc.strerror or str(exc))]
        ) from None
    return load_bytes(raw)


def problems_of(errors: Any) -> list[Problem]:
    """Pydantic errors -> Problems without positions (the gateway, for JSON bodies).

    A leading ``body`` in the location is dropped, so a problem reads ``resources.cpu`` exactly
    as ``unkey validate`` would name it; query/header/path problems keep their prefix.
    """
    out = []
    for e in errors:
        err = dict(e)
        loc = tuple(err.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        err["loc"] = loc
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            out.append(Problem(loc="", msg=f"body is not valid JSON: {ctx.get('error', '')}"))
            continue
        p = _problem_from_pydantic(err, {})
        out.append(Problem(loc=p.loc, msg=p.msg))
    return out
