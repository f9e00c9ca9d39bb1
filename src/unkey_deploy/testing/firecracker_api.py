"""Firecracker's API contract, for testing a driver that cannot run the real Firecracker here.

* :class:`FirecrackerSpec` validates a request (method, path, JSON body) against Firecracker's
  published OpenAPI (Swagger 2.0) description, read at run time from the file you pass (ours
  is ``/work/shared/specs/firecracker/firecracker.yaml``; it is not copied into the project).
  Bodies are checked with jsonschema (draft 4, which Swagger 2.0 schemas follow), and, like
  Firecracker itself (serde ``deny_unknown_fields``), properties the spec does not define are
  rejected.
* ``python -m unkey_deploy.testing.firecracker_api --api-sock S --spec F [--record R]`` is a
  fake Firecracker process: it serves the API on a unix socket, answers 400 with a
  ``fault_message`` to any request the spec rejects, enforces the pre-boot/runtime split
  (configuration only before ``InstanceStart``), checks that the files named in bodies exist,
  records every request as a JSON line, and exits on ``SendCtrlAltDel`` as a guest shutting
  down would.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import socketserver
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import yaml

_PRE_BOOT_ONLY = {"/machine-config", "/boot-source", "/drives/", "/network-interfaces/",
                  "/metrics", "/logger"}  # fmt: skip


def _close_objects(node: Any) -> Any:
    """Copy of a schema where every object with ``properties`` forbids unknown properties."""
    if isinstance(node, dict):
        out = {k: _close_objects(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_close_objects(v) for v in node]
    return node


class FirecrackerSpec:
    """Validates requests against the Firecracker OpenAPI document at ``path``."""

    def __init__(self, path: Path | str) -> None:
        self.doc: dict[str, Any] = yaml.safe_load(Path(path).read_text())
        if self.doc.get("swagger") != "2.0":
            raise ValueError(f"{path} is not a Swagger 2.0 document")
        self.definitions = _close_objects(copy.deepcopy(self.doc["definitions"]))
        self._paths: list[tuple[re.Pattern[str], str]] = []
        for template in self.doc["paths"]:
            rx = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            self._paths.append((re.compile(f"^{rx}$"), template))

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        for rx, template in self._paths:
            if rx.match(path):
                op = self.doc["paths"][template].get(method.lower())
                return (template, op) if op is not None else None
        return None

    def validate(self, method: str, path: str, body: Any) -> list[str]:
        """Every problem with the request (empty: the spec accepts it)."""
        found = self.operation(method, path)
        if found is None:
            return [f"{method} {path} is not an operation of the Firecracker API"]
        template, op = found
        problems: list[str] = []
        params = op.get("parameters", [])
        body_param = next((p for p in params if p.get("in") == "body"), None)
        if body_param is None:
            if body not in (None, {}):
                problems.append(f"{method} {template} takes no body")
            return problems
        if body is None:
            if body_param.get("required"):
                problems.append(f"{method} {template} requires a body")
            return problems
        schema = _close_objects(dict(body_param["schema"]))
        schema["definitions"] = self.definitions
        validator = jsonschema.Draft4Validator(schema)
        for err in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
            loc = ".".join(str(p) for p in err.path) or "(body)"
            problems.append(f"{method} {template}: {loc}: {err.message}")
        # path ids must agree with the ids in the body (Firecracker checks this too)
        for p in params:
            if p.get("in") == "path" and isinstance(body, dict):
                key = p["name"]
                value = path.rstrip("/").rsplit("/", 1)[-1]
                body_key = {"iface_id": "iface_id", "drive_id": "drive_id"}.get(key)
                if body_key and body.get(body_key) != value:
                    problems.append(f"{method} {template}: {body_key} does not match the path")
        return problems


class _State:
    def __init__(self, spec: FirecrackerSpec, record: Path | None) -> None:
        self.spec = spec
        self.record = record
        self.started = False
        self.boot_source = False
        self.root_drive = False
        self.shutdown = False


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, code: int, body: Any = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _fault(self, msg: str) -> None:
            self._reply(400, {"fault_message": msg})

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                self._fault("body is not JSON")
                return
            problems = state.spec.validate(self.command, self.path, body)
            if state.record is not None:
                with open(state.record, "a") as f:
                    f.write(json.dumps({"method": self.command, "path": self.path,
                                        "body": body, "problems": problems}) + "\n")  # fmt: skip
            if problems:
                self._fault("; ".join(problems))
                return
            if self.command == "GET" and self.path == "/":
                self._reply(200, {
                    "app_name": "Firecracker", "id": "fake",
                    "state": "Running" if state.started else "Not started",
                    "vmm_version": "fake",
                })  # fmt: skip
                return
            if self.command == "PUT" and any(
                self.path == p or (p.endswith("/") and self.path.startswith(p))
                for p in _PRE_BOOT_ONLY
            ):
                if state.started:
                    self._fault(
                        "The requested operation is not supported after starting the microVM."
                    )
                    return
                for key in ("kernel_image_path", "initrd_path", "path_on_host"):
                    if body and key in body and not Path(body[key]).exists():
                        self._fault(f"{key} {body[key]} does not exist")
                        return
                if self.path == "/boot-source":
                    state.boot_source = True
                if self.path.startswith("/drives/") and body and body.get("is_root_device"):
                    state.root_drive = True
                self._reply(204)
                return
            if self.command == "PUT" and self.path == "/actions":
                action = body["action_type"] if body else ""
                if action == "InstanceStart":
                    if state.started:
                        self._fault("The microVM is already running.")
                        return
                    if not (state.boot_source and state.root_drive):
                        self._fault("Cannot start microvm without kernel and root drive.")
                        return
                    state.started = True
                elif not state.started:
                    self._fault(f"{action} is not supported before starting the microVM.")
                    return
                elif action == "SendCtrlAltDel":
                    state.shutdown = True
                self._reply(204)
                return
            self._reply(204)

        do_GET = do_PUT = do_PATCH = _handle

    return Handler


class _UnixServer(socketserver.UnixStreamServer):
    def get_request(self) -> Any:
        conn, _ = self.socket.accept()
        return conn, ("fake-firecracker", 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fake-firecracker")
    ap.add_argument("--api-sock", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--record")
    args, _unknown = ap.parse_known_args(argv)
    state = _State(FirecrackerSpec(args.spec), Path(args.record) if args.record else None)
    sock = Path(args.api_sock)
    sock.unlink(missing_ok=True)
    server = _UnixServer(args.api_sock, _handler(state))
    try:
        while not state.shutdown:
            server.handle_request()
    finally:
        server.server_close()
        sock.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
