"""app.yaml: the good example loads; every malformed file in bad/ gives its clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from unkey_deploy import appspec
from unkey_deploy.core.errors import ValidationFailed

HERE = Path(__file__).parent
BAD = HERE / "bad"
ROOT = HERE.parent.parent
UNKEY = Path(sys.executable).parent / "unkey"


def _expected() -> list[tuple[str, str]]:
    rows = []
    for line in (BAD / "EXPECTED.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, fragment = line.split("\t", 1)
            rows.append((name, fragment))
    return rows


def test_every_bad_file_has_an_expectation() -> None:
    files = {p.name for p in BAD.iterdir() if p.suffix == ".yaml"}
    assert files == {name for name, _ in _expected()}
    assert len(files) >= 20


@pytest.mark.parametrize(("name", "fragment"), _expected())
def test_bad_file_gives_a_clear_error_with_position(name: str, fragment: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        appspec.load_file(BAD / name)
    rendered = [p.render(name) for p in info.value.problems]
    assert any(fragment in r for r in rendered), rendered
    for p in info.value.problems:
        assert p.line is not None and p.line >= 1 and p.column is not None and p.column >= 1


def test_example_is_valid_and_sizes_are_exact() -> None:
    spec = appspec.load_file(ROOT / "examples" / "app.yaml")
    assert spec.name == "hello-web"
    assert spec.memory_bytes == 256 * 1024**2
    assert spec.resources.disk_bytes == 1024**3
    assert appspec.parse_size("2GB") == 2_000_000_000
    assert appspec.parse_size("1.5GiB") == 1_610_612_736
    assert appspec.parse_size("512MiB") == 536_870_912


def test_every_problem_is_reported_with_line_and_column() -> None:
    text = "name: Bad_Name\nimage: nginx\nresources:\n  cpu: 0\n  memory: 1XB\nextra: 1\n"
    with pytest.raises(ValidationFailed) as info:
        appspec.load_text(text)
    got = [p.render("app.yaml") for p in info.value.problems]
    assert got[0].startswith("app.yaml:1:7: name: 'Bad_Name' is not a DNS label")
    assert got[1].startswith("app.yaml:4:8: resources.cpu: must be >= 1")
    assert got[2].startswith("app.yaml:5:11: resources.memory: unknown unit 'XB'")
    assert got[3] == "app.yaml:6:1: extra: unknown field 'extra'"


@pytest.mark.parametrize(
    "ref",
    [
        "nginx",
        "nginx:1.27",
        "library/nginx:latest",
        "ghcr.io/acme/app:v1.2.3",
        "localhost:5000/acme/app",
        "127.0.0.1:5000/app@sha256:" + "a" * 64,
        "registry.example.com/a/b/c:tag@sha256:" + "0" * 64,
        "oci:./build/layout:v1",
        "oci:/abs/layout",
        "docker-archive:/tmp/app.tar",
    ],
)
def test_image_references_accepted(ref: str) -> None:
    assert appspec.check_image_reference(ref) == ref


@pytest.mark.parametrize(
    "ref",
    ["", "UPPER/app", "app:", "app@sha256:xyz", "-bad/app", "a b", "oci:", "app:" + "t" * 200],
)
def test_image_references_refused(ref: str) -> None:
    with pytest.raises(ValueError):
        appspec.check_image_reference(ref)


def test_ten_megabyte_file_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"name: web\n" + b"# padding padding padding padding\n" * 310_000)
    assert big.stat().st_size > 10_000_000
    with pytest.raises(ValidationFailed) as info:
        appspec.load_file(big)
    assert "the limit is" in info.value.problems[0].msg


def test_validate_command_exit_codes_and_output(tmp_path: Path) -> None:
    ok = subprocess.run(
        [str(UNKEY), "validate", str(ROOT / "examples" / "app.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    bad = BAD / "cpu_huge.yaml"
    res = subprocess.run(
        [str(UNKEY), "validate", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 2
    assert f"{bad}:4:8: resources.cpu: must be <= 32" in res.stdout + res.stderr
    missing = subprocess.run(
        [str(UNKEY), "validate", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2


def test_core_tags_and_timestamps_still_load() -> None:
    """Only tags outside YAML's core schema are refused: ``!!str`` is a way to quote, and a
    date-like value stays its text."""
    spec = appspec.load_text(
        "name: web\nimage: nginx:1.27\nresources: {cpu: !!int 1, memory: 1GB}\n"
        "env: {PORT: !!str 8080, SINCE: 2024-01-01}\n"
    )
    assert spec.env == {"PORT": "8080", "SINCE": "2024-01-01"}
    assert spec.resources.cpu == 1
