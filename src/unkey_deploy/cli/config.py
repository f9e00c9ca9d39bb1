"""Where the CLI finds the API: flags, then environment, then the config file, then a local stack.

Order (first wins): ``UNKEY_API_URL`` / ``UNKEY_API_KEY`` / ``UNKEY_CA_CERT`` /
``UNKEY_ADMIN_TOKEN``; the config file ``$UNKEY_CONFIG_HOME/config.json`` (default
``~/.config/unkey/config.json``, written by ``unkey login`` with mode 0600); the state of a local
stack started by ``unkey dev up`` in ``./.unkey`` (its URL, certificate and admin token).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InvalidInput, Unauthenticated
from ..gateway.client import GatewayClient


@dataclass(frozen=True)
class ClientSettings:
    api_url: str | None
    api_key: str | None
    ca_cert: str | None
    admin_token: str | None

    def client(self, *, need_key: bool = True, need_admin: bool = False) -> GatewayClient:
        if not self.api_url:
            raise InvalidInput(
                "no API URL configured",
                suggestion="run `unkey dev up`, `unkey login --api-url URL`, or set UNKEY_API_URL",
            )
        if need_key and not self.api_key:
            raise Unauthenticated(
                "no API key configured",
                suggestion="run `unkey login`, or set UNKEY_API_KEY",
            )
        if need_admin and not self.admin_token:
            raise Unauthenticated(
                "no admin token configured",
                suggestion="set UNKEY_ADMIN_TOKEN (the local stack's is in .unkey/admin-token)",
            )
        return GatewayClient(
            self.api_url,
            api_key=self.api_key,
            admin_token=self.admin_token,
            ca_cert=self.ca_cert,
        )


def config_home(environ: Mapping[str, str]) -> Path:
    if environ.get("UNKEY_CONFIG_HOME"):
        return Path(environ["UNKEY_CONFIG_HOME"])
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "unkey"


def config_file(environ: Mapping[str, str]) -> Path:
    return config_home(environ) / "config.json"


def _read_json(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidInput(
            f"cannot read {path}: {exc}", suggestion="fix or delete it, then `unkey login`"
        ) from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} must hold a JSON object")
    return {k: str(v) for k, v in data.items() if v is not None}


def resolve(
    environ: Mapping[str, str] | None = None, data_dir: Path | None = None
) -> ClientSettings:
    env = os.environ if environ is None else environ
    stack = _read_json((data_dir or Path(env.get("UNKEY_DATA_DIR", ".unkey"))) / "stack.json")
    admin_token = None
    if stack.get("admin_token_file"):
        try:
            admin_token = Path(stack["admin_token_file"]).read_text().strip()
        except OSError:
            admin_token = None
    saved = _read_json(config_file(env))

    def pick(env_name: str, key: str, fallback: str | None = None) -> str | None:
        return env.get(env_name) or saved.get(key) or stack.get(key) or fallback

    return ClientSettings(
        api_url=pick("UNKEY_API_URL", "api_url"),
        api_key=pick("UNKEY_API_KEY", "api_key"),
        ca_cert=pick("UNKEY_CA_CERT", "ca_cert"),
        admin_token=pick("UNKEY_ADMIN_TOKEN", "admin_token", admin_token),
    )


def save(environ: Mapping[str, str], values: dict[str, str]) -> Path:
    """Write the config file with mode 0600 (its directory 0700), atomically."""
    path = config_file(environ)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(values, fh, indent=2, sort_keys=True)
        fh.write("\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return path
