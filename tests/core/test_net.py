from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path

import pytest

from unkey_deploy.core import net


def _draw(n: int) -> list[int]:
    return [net.free_port() for _ in range(n)]


def test_free_port_never_hands_the_same_port_to_two_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(net, "LEDGER", tmp_path / "ports.json")
    ctx = multiprocessing.get_context("fork")  # children inherit the patched ledger path
    with ctx.Pool(4) as pool:
        draws = [p for chunk in pool.map(_draw, [50] * 4) for p in chunk]
    assert len(draws) == len(set(draws)) == 200
    lo, hi = net.DRAW_RANGE
    assert all(lo <= p <= hi for p in draws)  # below the kernel's range for outgoing connections
    for p in draws[:20]:  # and each was bindable when drawn
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_free_port_skips_a_port_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net, "LEDGER", tmp_path / "ports.json")
    monkeypatch.setattr(net, "DRAW_RANGE", (net.DRAW_RANGE[0], net.DRAW_RANGE[0] + 1))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", net.DRAW_RANGE[0]))
        busy.listen()
        assert net.free_port() == net.DRAW_RANGE[0] + 1
