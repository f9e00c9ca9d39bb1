"""A real nats-server for tests: one per test or per module, on a free 127.0.0.1 port with its
own store dir, always stopped afterwards. ``server.stop(); ...; server.start()`` restarts it on
the same port and store, which simulates an outage clients must ride out.

In a conftest::

    @pytest.fixture
    def nats_server(tmp_path):
        with running_nats(tmp_path / "nats") as server:
            yield server
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..bus.server import NatsServer


@contextmanager
def running_nats(store_dir: Path) -> Iterator[NatsServer]:
    server = NatsServer(store_dir)
    server.start()
    try:
        yield server
    finally:
        server.kill() if server.running else None
        server.stop()
