"""metald's readiness probe (``service.http_status``): a bare HTTP/1.0 GET that says what status
an app answered, and says nothing (None) for what is not an HTTP answer."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from unkey_deploy.metald.service import http_status


@pytest.fixture
def server() -> Iterator[tuple[str, list[bytes], list[bytes]]]:
    """A TCP server on 127.0.0.1 that answers each connection with the next reply queued
    (and records each request); an empty reply closes without a word."""
    lsock = socket.create_server(("127.0.0.1", 0))
    replies: list[bytes] = []
    requests: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                requests.append(conn.recv(4096))
                if replies:
                    conn.sendall(replies.pop(0))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{lsock.getsockname()[1]}", replies, requests
    lsock.close()
    t.join(5)


def test_status_of_an_http_answer(server: tuple[str, list[bytes], list[bytes]]) -> None:
    url, replies, requests = server
    replies += [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.0 503 Busy\r\n\r\n"]
    assert http_status(url, "/healthz", connect_timeout=1, timeout=1) == 200
    assert requests[0].startswith(b"GET /healthz HTTP/1.0\r\n")
    assert f"Host: {url[7:]}".encode() in requests[0]
    assert http_status(url, "/", connect_timeout=1, timeout=1) == 503


def test_no_status_when_nothing_answers_http(
    server: tuple[str, list[bytes], list[bytes]],
) -> None:
    url, replies, _ = server
    replies += [b"", b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 abc\r\n\r\n"]
    for _ in range(3):  # closed at once, another protocol, a malformed status line
        assert http_status(url, "/", connect_timeout=1, timeout=1) is None
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there: refused
    assert http_status(f"http://127.0.0.1:{port}", "/", connect_timeout=1, timeout=1) is None
