"""Print the gateway OpenAPI spec: `python -m unkey_deploy.gateway.openapi > docs/openapi.json`.

The checked-in ``docs/openapi.json`` must equal this output (a test checks it); regenerate with
``make openapi`` after changing a route or a schema, or when another area's router is mounted.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ..core.config import Settings
from ..store import db
from .app import create_app
from .server import extra_routers


def spec() -> dict[str, Any]:
    factory = db.session_factory(db.make_engine("sqlite://"))  # never used: no request is served
    app = create_app(Settings(), routers=extra_routers(), factory=factory)
    result: dict[str, Any] = app.openapi()
    return result


def render() -> str:
    return json.dumps(spec(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
