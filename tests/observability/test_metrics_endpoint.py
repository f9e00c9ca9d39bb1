"""core.metrics: the endpoint a worker service serves, and its port in the settings."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from unkey_deploy.core import config, metrics
from unkey_deploy.core.errors import Unavailable, ValidationFailed


@pytest.fixture(autouse=True)
def _stop_endpoints() -> Iterator[None]:
    yield
    metrics.shutdown()


def _families(port: int) -> dict[str, object]:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_serve_shows_the_given_registries_and_process_metrics_only() -> None:
    port = metrics.serve(0, metrics.BUILDER)
    assert port is not None
    metrics.BUILDS_STARTED.inc()
    fams = _families(port)
    assert {"unkey_builder_builds_started", "unkey_builder_build_seconds"} <= set(fams)
    assert "process_cpu_seconds" in fams  # the default registry's process collector
    others = ("unkey_deployer", "unkey_metald", "unkey_metering", "unkey_billing")
    assert not {n for n in fams if n.startswith(others)}
    started = next(
        s.value
        for s in fams["unkey_builder_builds_started"].samples  # type: ignore[attr-defined]
        if s.name == "unkey_builder_builds_started_total"
    )
    assert started >= 1


def test_serve_listens_on_loopback_only_and_off_without_a_port() -> None:
    assert metrics.serve(None, metrics.DEPLOYER) is None
    port = metrics.serve(0, metrics.DEPLOYER)
    assert port is not None
    assert _listening(port) == {"127.0.0.1"}


def _listening(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, p = local.split(":")
        if int(p, 16) == port and state == "0A":
            out.add(socket.inet_ntoa(bytes.fromhex(host)[::-1]))
    return out


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(Unavailable, match=f"cannot serve metrics on 127.0.0.1:{taken}"):
            metrics.serve(taken, metrics.METALD)


def test_union_and_render_merge_registries() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    Counter("obs_a", "a", registry=a).inc(2)
    Counter("obs_b", "b", registry=b).inc(3)
    text = metrics.render(a, b).decode()
    assert "obs_a_total 2.0" in text and "obs_b_total 3.0" in text
    merged = {f.name for f in text_string_to_metric_families(
        metrics.render(metrics.union(a, b)).decode())}  # fmt: skip
    assert {n for n in merged if not n.endswith("_created")} == {"obs_a", "obs_b"}


def test_metrics_ports_come_from_the_environment_and_are_validated() -> None:
    s = config.load(environ={"UNKEY_METRICS__BUILDERD": "9101", "UNKEY_METRICS__METALD": "9102"})
    assert (s.metrics.builderd, s.metrics.metald, s.metrics.deployer) == (9101, 9102, None)
    with pytest.raises(ValidationFailed) as exc:
        config.load(environ={"UNKEY_METRICS__DEPLOYER": "70000"})
    assert [p.loc for p in exc.value.problems] == ["metrics.deployer"]
    with pytest.raises(ValidationFailed) as exc:
        config.load(environ={"UNKEY_METRICS__NOPE": "1"})
    assert [p.loc for p in exc.value.problems] == ["metrics.nope"]
