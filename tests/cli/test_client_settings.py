"""What a careless operator configures for the CLI: a CA certificate path that is wrong, an API
URL that is no URL. Each is a named error with exit 2 (invalid input), never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from unkey_deploy.testing.gateway import UNKEY


def _whoami(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_")}
    clean.update(UNKEY_CONFIG_HOME=str(tmp_path / "cfg"), UNKEY_DATA_DIR=str(tmp_path / "none"),
                 UNKEY_API_KEY="uk_x", **env)  # fmt: skip
    return subprocess.run([str(UNKEY), "whoami"], env=clean, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)  # fmt: skip


@pytest.mark.parametrize("what", ["missing", "not a certificate", "a directory"])
def test_a_ca_certificate_that_cannot_be_loaded_is_named(tmp_path: Path, what: str) -> None:
    ca = tmp_path / "gateway.crt"
    if what == "not a certificate":
        ca.write_text("this is not PEM\n")
    elif what == "a directory":
        ca.mkdir()
    res = _whoami(tmp_path, UNKEY_API_URL="https://127.0.0.1:1", UNKEY_CA_CERT=str(ca))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"cannot load the CA certificate {ca}" in res.stderr
    assert "UNKEY_CA_CERT" in res.stderr  # what to do next


@pytest.mark.parametrize("url", ["http://[::1", "https://127.0.0.1:99999"])
def test_an_api_url_that_is_no_url_is_named(tmp_path: Path, url: str) -> None:
    res = _whoami(tmp_path, UNKEY_API_URL=url)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"the API URL {url!r} is not a valid URL" in res.stderr


def test_an_id_that_cannot_be_put_in_a_url_is_named(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNKEY_")}
    clean.update(UNKEY_CONFIG_HOME=str(tmp_path / "cfg"), UNKEY_DATA_DIR=str(tmp_path / "none"),
                 UNKEY_API_KEY="uk_x", UNKEY_API_URL="https://127.0.0.1:1")  # fmt: skip
    for args in (["deployments", "show", "dep_\x01"], ["deployments", "events", "dep_\x7f"]):
        res = subprocess.run([str(UNKEY), *args], env=clean, capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL, check=False)  # fmt: skip
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and "non-printable" in res.stderr
