"""app.yaml under fuzzing: random text, bytes and structures fed to ``unkey_deploy.appspec``
never raise anything but ``ValidationFailed``/``InvalidInput``, every problem says where it is,
and every valid generated spec survives a YAML round trip unchanged."""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unkey_deploy import appspec
from unkey_deploy.core.errors import InvalidInput, ValidationFailed

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
FIELDS = list(appspec.AppSpec.model_fields) + list(appspec.Resources.model_fields)
YAML_BITS = [
    "name", "image", "resources", "cpu", "memory", "port", "env", "command", "args", "replicas",
    "healthcheck", "path", "keep_shell", ": ", ":", "- ", "-", "\n", "  ", "\t", "{", "}", "[",
    "]", ",", "'", '"', "#", "&a", "*a", "!!binary", "!!python/object", "<<", "---", "...", "|",
    ">", "?", "%YAML 1.1", "1", "0x10", "1e9", "512MiB", "true", "null", "~", "\\", "\x00", "é",
    "\ufeff", "2024-01-01", ".inf", "-1",
]  # fmt: skip


def _check_problems(exc: InvalidInput, *, from_text: bool) -> None:
    assert str(exc)
    if isinstance(exc, ValidationFailed):
        assert exc.problems, "a ValidationFailed names at least one problem"
        for p in exc.problems:
            assert p.msg
            if from_text:
                # A file's problems point at a line and column.
                assert p.line is not None and p.line >= 1, p
                assert p.column is not None and p.column >= 1, p
            else:
                # Plain data: a field path, or the root when the document itself is wrong.
                assert p.loc or "document" in p.msg or p.line is not None, p


def _load_text(text: str) -> None:
    try:
        appspec.load_text(text)
    except InvalidInput as exc:
        _check_problems(exc, from_text=True)


yaml_ish = st.lists(st.sampled_from(YAML_BITS) | st.text(max_size=6), max_size=40).map("".join)


@FUZZ
@given(yaml_ish)
def test_yaml_ish_text_never_crashes(text: str) -> None:
    _load_text(text)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_never_crash(raw: bytes) -> None:
    try:
        appspec.load_bytes(raw)
    except InvalidInput as exc:
        _check_problems(exc, from_text=True)


scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["512MiB", "1GiB", "nginx:1.27", "/", "0", "-1", "64GiB", "1e400"])
)  # fmt: skip
keys = st.sampled_from(FIELDS) | st.text(max_size=10)
structures = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=6),
    max_leaves=25,
)


@FUZZ
@given(structures)
def test_random_structures_never_crash(data: Any) -> None:
    try:
        appspec.validate_data(data)
    except InvalidInput as exc:
        _check_problems(exc, from_text=False)
    # The same structure written as YAML (when it can be) goes through the file path too.
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return
    _load_text(text)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 50_000,
        "{a: " * 20_000,
        "- " * 20_000 + "x",
        "a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 2000)),
        "name: [" + "[" * 5_000 + "]" * 5_001,
    ],
    ids=["deep-flow-list", "deep-flow-map", "deep-block-list", "deep-block-map", "deep-field"],
)
def test_deeply_nested_documents_are_refused_cleanly(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        appspec.load_text(text)
    _check_problems(info.value, from_text=True)


# --- valid specs round-trip ----------------------------------------------------------------------

label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
env_name = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,15}\Z")
# Characters a YAML stream may carry raw (C0/C1 controls, surrogates, U+FFFE/FFFF may not).
printable = st.text(
    st.characters(
        codec="utf-8", exclude_categories=("Cc", "Cs", "Cn"), exclude_characters="\ufeff"
    ),
    max_size=30,
)
memory = st.integers(64, 65536).map(lambda m: f"{m}MiB") | st.integers(
    appspec.MIN_MEMORY, appspec.MAX_MEMORY
)
image = st.builds(
    lambda host, repo, tag: f"{host}{repo}:{tag}",
    st.sampled_from(["", "127.0.0.1:5055/", "registry.example.com/", "ghcr.io/org/"]),
    st.from_regex(r"\A[a-z0-9]{1,10}(/[a-z0-9]{1,8}){0,2}\Z"),
    st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}\Z"),
)
argv = st.lists(printable.filter(bool), min_size=1, max_size=4)
valid_specs = st.fixed_dictionaries(
    {
        "name": label,
        "image": image,
        "resources": st.fixed_dictionaries({"cpu": st.integers(1, 32), "memory": memory}),
    },
    optional={
        "port": st.integers(1, 65535),
        "env": st.dictionaries(env_name, printable, max_size=5),
        "command": argv,
        "args": argv,
        "replicas": st.integers(1, appspec.MAX_REPLICAS),
        "healthcheck": st.fixed_dictionaries(
            {},
            optional={
                "path": st.from_regex(r"\A/[a-z0-9/._-]{0,20}\Z"),
                "port": st.integers(1, 65535),
                "interval_s": st.integers(1, 300),
                "timeout_s": st.integers(1, 60),
            },
        ),
        "keep_shell": st.booleans(),
        "region": label,
    },
)


@FUZZ
@given(valid_specs)
def test_valid_specs_round_trip(data: dict[str, Any]) -> None:
    direct = appspec.validate_data(data)
    from_yaml = appspec.load_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    # JSON is YAML too (non-ASCII kept as is: PyYAML does not join \\ud800-style surrogate pairs)
    from_json = appspec.load_bytes(json.dumps(data, ensure_ascii=False).encode())
    assert from_yaml == direct == from_json
    again = appspec.validate_data(direct.model_dump(exclude_none=True))
    assert again == direct
    assert direct.name == data["name"] and direct.resources.cpu == data["resources"]["cpu"]
    assert direct.memory_bytes >= appspec.MIN_MEMORY


def test_fuzz_alphabet_is_meaningful() -> None:
    # Guard against a strategy that only ever produces rejects: the seed spec itself loads.
    spec = appspec.load_text(
        "name: hello\nimage: nginx:1.27\nresources: {cpu: 1, memory: 128MiB}\n"
    )
    assert spec.name == "hello" and set(string.ascii_lowercase) >= set(spec.name)
