"""Prometheus metrics of the worker services, and the ``/metrics`` endpoint that serves them.

Each service process (builderd, metald with its metering loop, the deployer, a standalone billing
aggregator) calls :func:`serve` once from its ``main()`` with the port from
``settings.metrics.<service>`` (``UNKEY_METRICS__<SERVICE>``; ``unkey dev up`` picks one per data
dir). The endpoint listens on 127.0.0.1 only. gatewayd serves ``/metrics`` on its own API port.

The metrics are defined here, once, so the names are in one place (a dashboard or alert greps
this file) and importing a module twice cannot register a name twice. Each service's metrics live
in that service's own registry (:data:`BUILDER`, :data:`METALD`, :data:`METERING`,
:data:`BILLING`, :data:`DEPLOYER`), so an endpoint shows only what its process does, plus the
process/GC metrics of the default registry. Names follow Prometheus conventions:
``unkey_<service>_<what>_<unit>``; counters end in ``_total`` (the client adds it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import Metric

from .errors import Unavailable

BUILDER = CollectorRegistry()
METALD = CollectorRegistry()
METERING = CollectorRegistry()
BILLING = CollectorRegistry()
DEPLOYER = CollectorRegistry()

# -- builderd ----------------------------------------------------------------------------------
BUILDS_STARTED = Counter(
    "unkey_builder_builds_started", "Build attempts started by a worker", registry=BUILDER
)
BUILDS_FINISHED = Counter(
    "unkey_builder_builds_finished",
    "Build attempts finished, by outcome (succeeded, cached, failed, retrying, cancelled,"
    " abandoned: a worker that lost its lease)",
    ["outcome"],
    registry=BUILDER,
)
BUILD_SECONDS = Histogram(
    "unkey_builder_build_seconds",
    "Wall time of a build attempt, queue claim to asset registered",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=BUILDER,
)

# -- metald -------------------------------------------------------------------------------------
VMS = Gauge("unkey_metald_vms", "VMs on this host by state", ["state"], registry=METALD)
VM_BOOT_SECONDS = Histogram(
    "unkey_metald_vm_boot_seconds",
    "Time from asking the driver to boot a VM until it is running",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=METALD,
)
VM_BOOTS = Counter(
    "unkey_metald_vm_boots", "VM boots by outcome (ok, failed)", ["outcome"], registry=METALD
)

# -- metering (billaged, runs inside the metald host process) ------------------------------------
SAMPLES_COLLECTED = Counter(
    "unkey_metering_samples_collected", "Usage samples read from VMs", registry=METERING
)
BATCHES_PUBLISHED = Counter(
    "unkey_metering_batches_published",
    "Sample batches acknowledged by JetStream",
    registry=METERING,
)
SPOOL_DEPTH = Gauge(
    "unkey_metering_spool_batches",
    "Batches waiting in the local spool for the bus",
    registry=METERING,
)

# -- billing aggregator -------------------------------------------------------------------------
BATCHES_PROCESSED = Counter(
    "unkey_billing_batches_processed",
    "Sample batches from the bus written to ClickHouse",
    registry=BILLING,
)
BATCHES_QUARANTINED = Counter(
    "unkey_billing_batches_quarantined",
    "Batches set aside as invalid (never dropped)",
    registry=BILLING,
)
FLUSH_SECONDS = Histogram(
    "unkey_billing_flush_seconds",
    "Time to write one flush of batches to ClickHouse",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=BILLING,
)

# -- deployer -----------------------------------------------------------------------------------
DEPLOYS = Counter(
    "unkey_deployer_deploys",
    "Deploy attempts finished, by outcome (ready, failed, interrupted by a stop)",
    ["outcome"],
    registry=DEPLOYER,
)
DEPLOY_SECONDS = Histogram(
    "unkey_deployer_deploy_seconds",
    "Wall time of a deployment, claimed to ready or failed",
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=DEPLOYER,
)
STOPS = Counter(
    "unkey_deployer_stops",
    "Stop attempts of deployments finished, by outcome (stopped, failed)",
    ["outcome"],
    registry=DEPLOYER,
)

# labelled series start at zero, so a scrape shows every outcome before the first one happens
for _outcome in ("succeeded", "cached", "failed", "retrying", "cancelled", "abandoned"):
    BUILDS_FINISHED.labels(_outcome)
for _outcome in ("ok", "failed"):
    VM_BOOTS.labels(_outcome)
for _outcome in ("ready", "failed", "interrupted"):
    DEPLOYS.labels(_outcome)
for _outcome in ("stopped", "failed"):
    STOPS.labels(_outcome)

_lock = threading.Lock()
_servers: list[WSGIServer] = []


class _Union:
    """A collector showing the metrics of several registries as one."""

    def __init__(self, registries: Iterable[CollectorRegistry]) -> None:
        self.registries = tuple(registries)

    def collect(self) -> Iterator[Metric]:
        for registry in self.registries:
            yield from registry.collect()


def union(*registries: CollectorRegistry) -> CollectorRegistry:
    """One registry showing ``registries`` (for an endpoint serving several services)."""
    out = CollectorRegistry(auto_describe=False)
    out.register(_Union(registries))
    return out


def render(*registries: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registries`` (gatewayd adds :data:`BILLING`)."""
    return b"".join(generate_latest(r) for r in registries)


# Which process answers on a port: the local stack's health check compares it with the pid it
# started, so another stack's service that happens to hold the same port is not taken for ours.
_PID = Gauge("unkey_process_pid", "pid of the process serving these metrics", registry=REGISTRY)


def serve(port: int | None, *registries: CollectorRegistry, host: str = "127.0.0.1") -> int | None:
    """Serve ``registries`` and the process metrics at ``http://host:port/metrics`` from a
    daemon thread.

    ``port`` None: metrics are off (returns None). 0: any free port. Returns the bound port.
    Raises :class:`Unavailable` when the port is taken, naming it.
    """
    if port is None:
        return None
    _PID.set(os.getpid())
    try:
        served = union(*registries, REGISTRY)
        server, _thread = start_http_server(port, addr=host, registry=served)
    except OSError as exc:
        raise Unavailable(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
            suggestion="choose another port (metrics.<service> / UNKEY_METRICS__<SERVICE>)",
        ) from exc
    with _lock:
        _servers.append(server)
    return int(server.server_address[1])


def shutdown() -> None:
    """Stop every endpoint :func:`serve` started in this process (tests; mains just exit)."""
    with _lock:
        servers, _servers[:] = list(_servers), []
    for server in servers:
        server.shutdown()
        server.server_close()
