"""The local stack: every service as a background process with a pid file and a log.

``unkey dev up`` prepares the data dir (TLS certificate, admin token, database schema), starts
each service of :data:`SERVICES` that is not running, waits until each is healthy and writes
``stack.json`` (API URL, CA certificate, admin token file) for the CLI. ``unkey dev down`` stops
them in reverse order with SIGTERM, waiting for each to finish what it is doing (SIGKILL only after
the grace period); ``unkey dev down --purge-vms`` (:meth:`Stack.down` with ``purge_vms``) has
metald delete its VMs first and waits for that as long as the VMs need. Nothing lives only in
memory: state is in the database and files under the data dir, so ``down`` then ``up``
continues where it stopped.

Later services (builderd, metald, billaged, nats-server, the billing service) plug in with
:func:`register` and a :class:`ServiceSpec`.

Layout of the data dir (default ``.unkey``)::

    control.db          control-plane database (SQLite, WAL)
    tls/gateway.{crt,key}
    admin-token         (0600)
    stack.json          what the CLI reads
    run/<service>.pid   logs/<service>.log
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.exc import SQLAlchemyError

from ..bus.server import nats_server_binary
from ..core.config import Settings
from ..core.errors import Unavailable
from ..core.net import free_port
from ..gateway.server import admin_token_file, cert_hosts, ensure_admin_token, tls_files
from ..gateway.tls import client_context, ensure_self_signed
from ..metald.api import Scheduler
from ..store import db

Argv = Callable[[Settings], list[str]]
Health = Callable[[Settings], bool]

# why the health checks of a service failed, by (data dir, service): [first, last], named in the
# error of a `dev up` that timed out, so a service that never became healthy says what was seen
_PROBLEMS: dict[tuple[str, str], list[str]] = {}


def _unhealthy(settings: Settings, name: str, why: str) -> bool:
    seen = _PROBLEMS.setdefault((str(settings.data_dir.resolve()), name), [why, why])
    seen[1] = why
    return False


def _last_problem(settings: Settings, name: str) -> str:
    seen = _PROBLEMS.get((str(settings.data_dir.resolve()), name))
    if seen is None:
        return ""
    first, last = seen
    return f" (last check: {last})" + (f" (first: {first})" if first != last else "")


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service of the stack."""

    name: str
    argv: Argv
    health: Health
    url: Callable[[Settings], str | None] = lambda _s: None
    env: dict[str, str] = field(default_factory=dict)
    stop_timeout_s: float = 15.0
    # `dev down --purge-vms`: the service is sent SIGUSR1 instead of SIGTERM, deletes what it
    # runs, then exits; how long that may take, reckoned before the signal (None: no purge)
    purge_timeout_s: Callable[[Settings], float] | None = None
    # only run when the stack owns it (nats-server: not when bus.nats_url names a cluster)
    local_only: bool = False


def _unkey(*args: str) -> list[str]:
    return [sys.executable, "-m", "unkey_deploy.cli.main", *args]


def gateway_url(settings: Settings) -> str:
    cfg = settings.gateway
    scheme = "https" if cfg.tls else "http"
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host  # noqa: S104
    return f"{scheme}://{host}:{cfg.port}"


def _gateway_argv(settings: Settings) -> list[str]:
    argv = _unkey(
        "gatewayd",
        "--data-dir",
        str(settings.data_dir),
        "--host",
        settings.gateway.host,
        "--port",
        str(settings.gateway.port),
    )
    if not settings.gateway.tls:
        argv.append("--plain-http")
    if settings.database_url:
        argv += ["--database-url", settings.database_url]
    return argv


def _gateway_health(settings: Settings) -> bool:
    cert, _key = tls_files(settings)
    url = gateway_url(settings) + "/healthz"
    try:
        r = httpx.get(
            url, verify=client_context(cert) if settings.gateway.tls else False, timeout=2.0
        )
    except httpx.HTTPError as exc:
        return _unhealthy(settings, "gatewayd", f"GET {url}: {exc!r}")
    return r.status_code == 200 or _unhealthy(settings, "gatewayd", f"GET {url}: {r.status_code}")


def native_dir(settings: Settings) -> Path:
    """The native pieces (`make native`): as configured, or the checkout's ``.native`` when the
    configured relative directory does not exist here (``unkey dev up`` run from elsewhere), so
    services never rebuild the init or miss the guest kernel because of the working directory."""
    native = settings.native_dir
    if not native.is_absolute() and not native.exists():
        checkout = Path(__file__).resolve().parents[3] / ".native"
        if checkout.exists():
            return checkout
    return native.resolve()


def _kept_port(path: Path, draw: Callable[[], int] = free_port) -> int:
    """The port kept in ``path``, drawn (and kept) the first time; removing the file makes
    the next call draw again."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        path.parent.mkdir(parents=True, exist_ok=True)
        port = draw()
        path.write_text(f"{port}\n")
        return port


def _port_file(data_dir: Path, name: str) -> Path:
    """Where the port drawn for service ``name`` is kept."""
    if name == "nats-server":
        return data_dir / "nats" / "port"
    if name == "registry":
        return data_dir / "registry" / "port"
    return data_dir / "metrics" / f"{name}.port"


def nats_port(settings: Settings) -> int:
    """The local nats-server's port, chosen once per data dir and kept (clients reconnect)."""
    return _kept_port(_port_file(settings.data_dir.resolve(), "nats-server"))


def nats_url(settings: Settings) -> str:
    return settings.bus.nats_url or f"nats://127.0.0.1:{nats_port(settings)}"


def _nats_argv(settings: Settings) -> list[str]:
    store = settings.data_dir.resolve() / "nats"
    return [
        str(nats_server_binary()), "-js", "-a", "127.0.0.1", "-p", str(nats_port(settings)),
        "-sd", str(store / "jetstream"), "--http_port", "0",
    ]  # fmt: skip


def _nats_health(settings: Settings) -> bool:
    port = nats_port(settings)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            head = s.recv(4)
    except OSError as exc:
        return _unhealthy(settings, "nats-server", f"127.0.0.1:{port}: {exc!r}")
    return head.startswith(b"INFO") or _unhealthy(
        settings, "nats-server", f"127.0.0.1:{port} answered {head!r}, not INFO"
    )


REGISTRY_PORT = 5055  # examples/app.yaml names this port; another is used when it is taken


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def registry_port(settings: Settings) -> int:
    """The local registry's port, chosen once per data dir: 5055 (the port examples/app.yaml
    names) for the default data dir when it is free, any free port otherwise, so stacks in
    other data dirs (tests, a second stack) never race for 5055."""
    default_dir = settings.data_dir.resolve() == Path(".unkey").resolve()

    def draw() -> int:
        return REGISTRY_PORT if default_dir and _port_free(REGISTRY_PORT) else free_port()

    return _kept_port(_port_file(settings.data_dir.resolve(), "registry"), draw)


def registry_host(settings: Settings) -> str:
    return f"127.0.0.1:{registry_port(settings)}"


def _registry_argv(settings: Settings) -> list[str]:
    """Debian's docker-registry for images built on this machine (examples/, CI pipelines)."""
    root = settings.data_dir.resolve() / "registry"
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "config.json"  # YAML is a superset of JSON
    try:
        secret = str(json.loads(cfg.read_text())["http"]["secret"])
    except (OSError, ValueError, KeyError, TypeError):
        secret = os.urandom(16).hex()
    # written at every start: the port is drawn again when the last one was taken meanwhile
    cfg.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "warn", "accesslog": {"disabled": True}},
                "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
                "http": {"addr": registry_host(settings), "secret": secret},
            }
        )
    )
    return ["/usr/bin/docker-registry", "serve", str(cfg)]


def _registry_health(settings: Settings) -> bool:
    pid, why = Stack(settings).pid_or_why("registry", forget=False)
    if pid is None:  # another registry may answer on the port
        return _unhealthy(settings, "registry", why)
    url = f"http://{registry_host(settings)}/v2/"
    try:
        code = httpx.get(url, timeout=1).status_code
    except httpx.HTTPError as exc:
        return _unhealthy(settings, "registry", f"GET {url}: {exc!r}")
    return code == 200 or _unhealthy(settings, "registry", f"GET {url}: {code}")


def metrics_port(settings: Settings, name: str) -> int:
    """The port of a worker service's ``/metrics``: ``metrics.<name>`` when set, else one chosen
    once per data dir and kept (a dashboard's scrape config stays valid across restarts)."""
    configured = getattr(settings.metrics, name)
    if configured:
        return int(configured)
    return _kept_port(_port_file(settings.data_dir.resolve(), name))


def metrics_url(name: str) -> Callable[[Settings], str]:
    return lambda settings: f"http://127.0.0.1:{metrics_port(settings, name)}/metrics"


def _metrics_health(name: str) -> Health:
    """Health of a worker service without an API port: it is running and serves ``/metrics``."""

    def check(settings: Settings) -> bool:
        pid, why = Stack(settings).pid_or_why(name, forget=False)
        if pid is None:
            return _unhealthy(settings, name, why)
        url = metrics_url(name)(settings)
        try:
            r = httpx.get(url, timeout=1)
        except httpx.HTTPError as exc:
            return _unhealthy(settings, name, f"GET {url}: {exc!r}")
        if r.status_code != 200:
            return _unhealthy(settings, name, f"GET {url}: {r.status_code}")
        # the answer must come from our process, not another stack's holding the same port
        # (parsed: the exposition writes 1.234567e+06 for a pid of 1234567)
        served = [ln.split()[-1] for ln in r.text.splitlines()
                  if ln.startswith("unkey_process_pid ")]  # fmt: skip
        with contextlib.suppress(ValueError):
            if served and float(served[0]) == pid:
                return True
        what = f"pid {served[0]}" if served else "no unkey_process_pid"
        return _unhealthy(settings, name, f"GET {url} answered for {what}, not pid {pid}")

    return check


METALD_STOP_S = 30.0  # metald's stop: metering flushes its partial batches, the agent closes
# freeing one VM beyond its guest's shutdown grace: the VMM killed (the sandbox waits up to 5 s
# for its processes to go, QEMU 2 s for QMP and 2 s for `quit`), then its cgroup, mounts and links
VM_FREE_S = 10.0


def recorded_vms(settings: Settings) -> int:
    """How many VMs the stack's database records (0 when it cannot be read)."""
    engine = db.make_engine(settings.resolved_database_url)
    scheduler = Scheduler(engine)
    try:
        return len(scheduler.list())
    except SQLAlchemyError:
        return 0
    finally:
        scheduler.close()
        engine.dispose()


def metald_purge_timeout_s(settings: Settings, vms: int | None = None) -> float:
    """How long metald may take to purge: its usual stop, then, VM after VM (it deletes them one
    at a time), a guest's shutdown grace (``metald.stop_timeout_s``) and :data:`VM_FREE_S`.
    ``vms``: every VM the database records (:func:`recorded_vms`); with a database shared by
    several hosts that over-counts, which only lengthens the wait for a metald that hangs."""
    n = recorded_vms(settings) if vms is None else vms
    return METALD_STOP_S + n * (settings.metald.stop_timeout_s + VM_FREE_S)


# services serving /metrics on a port of their own (gatewayd serves it on its API port)
METRICS_SERVICES = ("builderd", "metald", "deployer")


def _module(name: str) -> Argv:
    return lambda _s: [sys.executable, "-m", name]


SERVICES: list[ServiceSpec] = [
    ServiceSpec("nats-server", _nats_argv, _nats_health, url=nats_url, local_only=True),
    ServiceSpec("registry", _registry_argv, _registry_health, url=registry_host),
    ServiceSpec("gatewayd", _gateway_argv, _gateway_health, url=gateway_url),
    ServiceSpec(
        "builderd",
        _module("unkey_deploy.builder.service"),
        _metrics_health("builderd"),
        url=metrics_url("builderd"),
    ),
    ServiceSpec(
        "metald",
        _module("unkey_deploy.metald.hostd"),
        _metrics_health("metald"),
        url=metrics_url("metald"),
        stop_timeout_s=METALD_STOP_S,
        purge_timeout_s=metald_purge_timeout_s,
    ),
    ServiceSpec(
        "deployer",
        _module("unkey_deploy.deployer.service"),
        _metrics_health("deployer"),
        url=metrics_url("deployer"),
    ),
]


def register(spec: ServiceSpec, *, before: str | None = None) -> None:
    """Add a service to the stack (``before``: start it before that service, e.g. nats first)."""
    if any(s.name == spec.name for s in SERVICES):
        raise ValueError(f"service {spec.name} is already registered")
    if before is None:
        SERVICES.append(spec)
    else:
        idx = next(i for i, s in enumerate(SERVICES) if s.name == before)
        SERVICES.insert(idx, spec)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    healthy: bool
    url: str | None
    log: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "running": self.running,
            "pid": self.pid,
            "healthy": self.healthy,
            "url": self.url,
            "log": self.log,
        }


class Stack:
    def __init__(self, settings: Settings, services: list[ServiceSpec] | None = None) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.services = SERVICES if services is None else services

    def _pid_file(self, name: str) -> Path:
        return self.data_dir / "run" / f"{name}.pid"

    def _log_file(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The pid of a running service (a stale pid file is removed)."""
        return self.pid_or_why(name)[0]

    def pid_or_why(self, name: str, *, forget: bool = True) -> tuple[int | None, str]:
        """:meth:`pid`, or None and why there is none. ``forget=False`` (health checks) keeps
        the pid file: only who started the service, or `dev status`/`down`, removes it."""
        path = self._pid_file(name)
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            return None, f"no pid in {path} ({exc!r})"
        if not _alive(pid):
            if forget:
                path.unlink(missing_ok=True)
            return None, f"pid {pid} of {path} is gone"
        if not _is_ours(pid, self.data_dir):
            if forget:
                path.unlink(missing_ok=True)
            cmd = _cmdline(pid)
            return None, f"pid {pid} of {path} is another program (reused pid): {cmd!r}"
        return pid, ""

    def prepare(self) -> None:
        """First run: data dir, TLS certificate, admin token, schema (idempotent)."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in ("run", "logs"):
            (self.data_dir / sub).mkdir(exist_ok=True)
        if self.settings.gateway.tls:
            cert, key = tls_files(self.settings)
            # (made before gatewayd starts: the same names gatewayd gives its own)
            ensure_self_signed(cert, key, hosts=cert_hosts(self.settings.gateway.host))
        ensure_admin_token(self.settings)
        engine = db.make_engine(self.settings.resolved_database_url)
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()
        cert, _ = tls_files(self.settings)
        state = {
            "api_url": gateway_url(self.settings),
            "ca_cert": str(cert.resolve()) if self.settings.gateway.tls else None,
            "admin_token_file": str(admin_token_file(self.settings).resolve()),
            "data_dir": str(self.data_dir),
        }
        (self.data_dir / "stack.json").write_text(json.dumps(state, indent=2) + "\n")

    def env(self) -> dict[str, str]:
        """What every service of the stack is told: where the data, database and bus are."""
        env = {
            "UNKEY_DATA_DIR": str(self.data_dir),
            "UNKEY_NATIVE_DIR": str(native_dir(self.settings)),
            "UNKEY_BUS__NATS_URL": nats_url(self.settings),
        }
        if self.settings.database_url:
            env["UNKEY_DATABASE_URL"] = self.settings.database_url
        for name in METRICS_SERVICES:
            env[f"UNKEY_METRICS__{name.upper()}"] = str(metrics_port(self.settings, name))
        return env

    def _wanted(self, spec: ServiceSpec) -> bool:
        return not (spec.local_only and self.settings.bus.nats_url)

    def _abandon(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """A service that did not come up: stop what is left of it and forget its drawn port
        (another process may have taken it meanwhile), so the next `dev up` starts it afresh."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        self._pid_file(name).unlink(missing_ok=True)
        if name in ("nats-server", "registry", *METRICS_SERVICES):  # the others: configured
            _port_file(self.data_dir, name).unlink(missing_ok=True)

    def up(self, *, timeout_s: float = 120.0) -> list[ServiceStatus]:
        """Start each service that is not running and wait until it is healthy; raises
        Unavailable naming a service that did not come up, or that exited by the end."""
        self.prepare()
        for spec in self.services:
            if not self._wanted(spec) or self.pid(spec.name) is not None:
                continue
            log_path = self._log_file(spec.name)
            with open(log_path, "ab") as log_fh:
                proc = subprocess.Popen(
                    spec.argv(self.settings),
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, **self.env(), **spec.env},
                )
            self._pid_file(spec.name).write_text(f"{proc.pid}\n")
            deadline = time.monotonic() + timeout_s
            while not spec.health(self.settings):
                if proc.poll() is not None:
                    self._abandon(spec.name, proc)
                    raise Unavailable(
                        f"{spec.name} exited with status {proc.returncode} while starting",
                        suggestion=f"see {log_path}:\n{_tail(log_path)}",
                    )
                if time.monotonic() > deadline:
                    why = _last_problem(self.settings, spec.name)
                    self._abandon(spec.name, proc)
                    raise Unavailable(
                        f"{spec.name} did not become healthy within {timeout_s:.0f} s{why}; "
                        "stopped",
                        suggestion=f"run `unkey dev up` again (--timeout for a slow machine); "
                        f"see {log_path}:\n{_tail(log_path)}",
                    )
                time.sleep(0.1)
        statuses = self.status()
        # one that became healthy and exited since (e.g. metald, failing to recover a VM)
        wanted = {spec.name for spec in self.services if self._wanted(spec)}
        dead = [st.name for st in statuses if st.name in wanted and not st.running]
        if dead:
            raise Unavailable(
                f"{', '.join(dead)} exited after starting",
                suggestion="".join(f"see {self._log_file(n)}:\n{_tail(self._log_file(n))}\n"
                                   for n in dead).rstrip(),
            )  # fmt: skip
        return statuses

    def down(self, *, purge_vms: bool = False) -> list[str]:
        """Stop every running service, last started first; returns the names stopped.

        VMs keep running (the next metald recovers them) unless ``purge_vms``: then a service
        with a ``purge_timeout_s`` (metald) is told (SIGUSR1) to stop and delete its VMs and
        free what they hold on the host (cgroups, mounts, links, nftables tables) before it
        exits, and is given as long as that takes for the VMs recorded (the services started
        after it, which could ask for new VMs, are stopped by then). Raises Unavailable, once
        every service is stopped, if a purge had to be cut short with SIGKILL.
        """
        stopped = []
        cut_short: list[tuple[str, str]] = []  # (service, what happened)
        # a purge needs its service: one not running purges nothing (said below)
        absent = [
            s.name
            for s in self.services
            if purge_vms and s.purge_timeout_s is not None and self.pid(s.name) is None
        ]
        for spec in reversed(self.services):
            pid = self.pid(spec.name)
            if pid is None:
                continue
            purge = spec.purge_timeout_s if purge_vms else None
            timeout_s = spec.stop_timeout_s if purge is None else purge(self.settings)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if purge is None else signal.SIGUSR1)
            deadline = time.monotonic() + timeout_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if purge is not None:
                    cut_short.append(
                        (spec.name, f"{spec.name} (pid {pid}) after {timeout_s:.0f} s")
                    )
            self._pid_file(spec.name).unlink(missing_ok=True)
            stopped.append(spec.name)
        if cut_short:
            raise Unavailable(
                f"the purge did not finish and was killed: {', '.join(w for _, w in cut_short)}; "
                "VMs and what they hold on the host (cgroups, mounts, links, nftables tables) "
                f"may be left; stopped: {', '.join(stopped)}",
                suggestion="run `unkey dev up`, then `unkey dev down --purge-vms` again (the "
                "next metald recovers the VMs left); see "
                + ", ".join(str(self._log_file(n)) for n, _ in cut_short),
            )
        if absent and (n := recorded_vms(self.settings)):
            raise Unavailable(
                f"{' and '.join(absent)} was not running, so the {n} VM(s) the stack records "
                f"were not purged (they may still run and hold cgroups, mounts, links); "
                f"stopped: {', '.join(stopped) or 'nothing'}",
                suggestion="run `unkey dev up` (metald recovers its VMs), then `unkey dev down "
                "--purge-vms` again",
            )
        return stopped

    def status(self) -> list[ServiceStatus]:
        out = []
        for spec in self.services:
            pid = self.pid(spec.name)
            out.append(
                ServiceStatus(
                    name=spec.name,
                    running=pid is not None,
                    pid=pid,
                    healthy=pid is not None and spec.health(self.settings),
                    url=spec.url(self.settings),
                    log=str(self._log_file(spec.name)),
                )
            )
        return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except (OSError, UnicodeDecodeError):
        return "?"


def _is_ours(pid: int, data_dir: Path) -> bool:
    """Guard against a recycled pid: the process must be one of our Python service commands, or
    a helper (nats-server, docker-registry) whose command line names this stack's data dir."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"unkey_deploy" in cmdline or str(data_dir).encode() in cmdline


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
