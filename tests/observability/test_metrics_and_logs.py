"""Issue 7: every service of ``unkey dev up`` serves Prometheus ``/metrics`` with its own
metrics, and one deploy can be followed across gatewayd, the deployer, builderd and metald by
grepping their JSON logs for the deploy's request_id / deployment_id / build_id / vm_id.

One real stack (tests/e2e's CLI-driven ``Stack``: its own data dir, free ports and reserved
subnet) with the sandbox VM driver; stopped (VMs purged) whatever happens, and checked to leave
no process behind.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e import test_journey  # tests/ is on sys.path
from e2e.test_journey import Stack
from unkey_deploy.dev.example import push_hello
from unkey_deploy.gateway.tls import client_context

# the e2e journey's stacks (same teardown: purged, no process left, data dir removed)
stack_factory = test_journey.stack_factory

pytestmark = [pytest.mark.root]

# the metric families each service must show (its own, defined in core/metrics.py)
OWN_METRICS = {
    "gatewayd": {"unkey_billing_batches_processed", "unkey_billing_flush_seconds"},
    "builderd": {"unkey_builder_builds_started", "unkey_builder_build_seconds"},
    "metald": {
        "unkey_metald_vms",
        "unkey_metald_vm_boot_seconds",
        "unkey_metering_samples_collected",
        "unkey_metering_batches_published",
        "unkey_metering_spool_batches",
    },
    "deployer": {"unkey_deployer_deploys", "unkey_deployer_deploy_seconds"},
}


def _log_lines(st: Stack, service: str) -> list[dict[str, Any]]:
    """The JSON lines of a service's log (plain lines, e.g. a startup banner, skipped)."""
    out = []
    for line in (st.data_dir / "logs" / f"{service}.log").read_text().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def _scrape(url: str, **kw: Any) -> dict[str, Any]:
    """GET ``url``; the Prometheus text it returns as {family name: family} (parse errors fail)."""
    r = httpx.get(url, timeout=10, **kw)
    assert r.status_code == 200, (url, r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("text/plain"), r.headers["content-type"]
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _value(families: dict[str, Any], sample: str, **labels: str) -> float:
    for fam in families.values():
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample}{labels or ''}")


def _metrics_urls(st: Stack) -> dict[str, str]:
    status = json.loads(st.unkey("dev", "status", "--data-dir", str(st.data_dir), "--json"))
    assert all(s["running"] and s["healthy"] for s in status), status
    urls = {s["name"]: s["url"] for s in status if s["name"] in OWN_METRICS}
    urls["gatewayd"] += "/metrics"
    return urls


def test_every_service_serves_metrics_and_one_deploy_is_followed_across_logs(
    stack_factory: Callable[[str], Stack], tmp_path: Path
) -> None:
    st = stack_factory("sandbox")
    st.up()
    ca = client_context(st.data_dir / "tls" / "gateway.crt")
    urls = _metrics_urls(st)
    assert set(urls) == set(OWN_METRICS)
    for name, url in urls.items():
        if name != "gatewayd":  # worker services: loopback only, on a port of their own
            assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
        families = _scrape(url, verify=ca) if url.startswith("https") else _scrape(url)
        missing = OWN_METRICS[name] - set(families)
        assert not missing, f"{name} ({url}) lacks {missing}"
        others = set().union(*(v for k, v in OWN_METRICS.items() if k != name)) & set(families)
        assert not others, f"{name} shows other services' metrics {others}"

    # one deploy of a small image through the CLI
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("<h1>observability</h1>\n")
    ref = push_hello(st.registry(), www)
    created = json.loads(st.unkey("customers", "create", f"obs-{uuid.uuid4().hex[:8]}", "--json"))
    customer_id = created["customer"]["id"]
    st.api_key = created["secret"]
    app = tmp_path / "app.yaml"
    app.write_text(f"name: obs\nimage: {ref}\nresources: {{cpu: 1, memory: 128MiB, disk: 256MiB}}\n"
                   "port: 8080\nhealthcheck: {path: /, interval_s: 5, timeout_s: 2}\n")  # fmt: skip
    dep = json.loads(st.unkey("deploy", str(app), "--wait", "--json", timeout_s=240))
    assert dep["state"] == "running", dep
    dep_id = dep["id"]

    # follow it: the deployer names its request, builderd carries it with the build id,
    # gatewayd logged the request that created it, metald the VM of the deployment
    deployer = [e for e in _log_lines(st, "deployer") if e.get("deployment_id") == dep_id]
    assert deployer, "no deployer log line names the deployment"
    request_id = deployer[0]["request_id"]
    assert request_id and all(e["customer_id"] == customer_id for e in deployer), deployer
    assert {e["event"] for e in deployer} >= {"deploy started", "build queued", "deploy ready"}
    build_id = next(e["build_id"] for e in deployer if e["event"] == "build queued")

    gateway = [e for e in _log_lines(st, "gatewayd") if e.get("request_id") == request_id]
    assert gateway, f"gatewayd logged nothing for request {request_id}"
    assert all(e["service"] == "gatewayd" for e in gateway)

    builder = [e for e in _log_lines(st, "builderd") if e.get("build_id") == build_id]
    assert {e["event"] for e in builder} >= {"build started"}, builder
    assert builder[-1]["event"] in ("build succeeded", "build cached"), builder
    for e in builder:
        assert (e["request_id"], e["deployment_id"], e["customer_id"]) == (
            request_id, dep_id, customer_id), e  # fmt: skip

    metald = [e for e in _log_lines(st, "metald") if e.get("deployment_id") == dep_id]
    assert any(e["event"] == "vm state" and e["state"] == "running" for e in metald), metald
    assert all(e["vm_id"].startswith("vm_") and e["customer_id"] == customer_id for e in metald)

    # and the counters moved where the work happened
    assert _value(_scrape(urls["builderd"]), "unkey_builder_builds_started_total") >= 1
    done = _scrape(urls["builderd"])
    finished = "unkey_builder_builds_finished_total"
    ok = _value(done, finished, outcome="succeeded") + _value(done, finished, outcome="cached")
    assert ok >= 1
    assert _value(_scrape(urls["deployer"]), "unkey_deployer_deploys_total", outcome="ready") == 1
    # metald refreshes the VMs-by-state gauge on its reconcile pass (every 0.2 s)
    deadline = time.monotonic() + 20
    while True:
        md = _scrape(urls["metald"])
        if _value(md, "unkey_metald_vms", state="running") == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _value(md, "unkey_metald_vms", state="running") == 1
    assert _value(md, "unkey_metald_vm_boot_seconds_count") == 1
    assert _value(md, "unkey_metald_vm_boots_total", outcome="ok") == 1
