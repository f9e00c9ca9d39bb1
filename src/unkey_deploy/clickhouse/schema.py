"""Versioned schema: ``migrations/NNN_name.sql`` applied in order, recorded in
``schema_migrations``.

The files are written for a single node (chDB or one server). :func:`render` turns the same text
into cluster DDL when ``BillingConfig.cluster`` is set:

- every ``CREATE TABLE x`` becomes ``x_local ON CLUSTER c`` with the ``Replicated*`` variant of
  its engine (``/clickhouse/tables/{shard}/{database}/x_local``, ``{replica}``), followed by a
  ``Distributed`` table ``x`` sharded by ``cityHash64(customer_id)``: all rows of a customer live
  on one shard, so ``FINAL`` on ``billing_hourly`` (applied per shard) still sees every version of
  a key, and the rollup chain of a VM stays on one node;
- materialized views read and write the ``_local`` tables (they fire on the node that stores the
  inserted block);
- ``ALTER TABLE x`` changes ``x_local``; a column change (``ADD/DROP/MODIFY/RENAME COLUMN``)
  also changes the Distributed ``x``, whose inserts name the columns;
- :data:`GLOBAL_TABLES` (``processed_batches``) are replicated to every node of the cluster
  (one replica set, no shard in the path) instead of sharded: any aggregator can check any batch;
- ``non_replicated_deduplication_window`` becomes ``replicated_deduplication_window``.

Reads and inserts always use the plain names, which are the Distributed tables on a cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from ..core.errors import InvalidInput

GLOBAL_TABLES = frozenset({"processed_batches"})
SHARDING_KEY = "cityHash64(customer_id)"

MIGRATIONS_TABLE_DDL = """CREATE TABLE IF NOT EXISTS schema_migrations
(
    version String,
    name String,
    applied_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree
ORDER BY version"""

_FILE_RE = re.compile(r"^(?P<version>\d{3})_(?P<name>[a-z0-9_]+)\.sql$")
_CREATE_TABLE_RE = re.compile(r"^CREATE TABLE IF NOT EXISTS (?P<name>\w+)\b", re.IGNORECASE)
_CREATE_MV_RE = re.compile(
    r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (?P<name>\w+) TO (?P<target>\w+) AS\b",
    re.IGNORECASE,
)
_ALTER_RE = re.compile(r"^ALTER TABLE (?P<name>\w+)\b", re.IGNORECASE)
_COLUMN_ALTER_RE = re.compile(r"\s*(ADD|DROP|MODIFY|RENAME|COMMENT) COLUMN\b", re.IGNORECASE)
_ENGINE_RE = re.compile(
    r"ENGINE = (?P<engine>MergeTree|ReplacingMergeTree|AggregatingMergeTree|SummingMergeTree)"
    r"(?:\((?P<args>[^)]*)\))?"
)
_FROM_RE = re.compile(r"\bFROM (?P<name>\w+)\b")


@dataclass(frozen=True, slots=True)
class Migration:
    version: str  # "001"
    name: str  # "metrics_raw"
    statements: tuple[str, ...]


def split_statements(sql: str) -> list[str]:
    """Split a migration file into statements (``;`` at the end of a line), dropping comments."""
    lines = [ln for ln in sql.splitlines() if not ln.lstrip().startswith("--")]
    out: list[str] = []
    current: list[str] = []
    for line in lines:
        current.append(line)
        if line.rstrip().endswith(";"):
            stmt = "\n".join(current).strip().rstrip(";").strip()
            if stmt:
                out.append(stmt)
            current = []
    tail = "\n".join(current).strip()
    if tail:
        out.append(tail)
    return out


def load_migrations() -> list[Migration]:
    """Every ``migrations/NNN_name.sql`` shipped with the package, in version order."""
    found: list[Migration] = []
    folder = resources.files(__package__).joinpath("migrations")
    for entry in folder.iterdir():
        m = _FILE_RE.match(entry.name)
        if m is None:
            if entry.name.endswith(".sql"):
                raise InvalidInput(f"migration file {entry.name!r} is not named NNN_name.sql")
            continue
        found.append(
            Migration(m["version"], m["name"], tuple(split_statements(entry.read_text("utf-8"))))
        )
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise InvalidInput(f"duplicate migration versions in {versions}")
    return found


def _quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render(sql: str, cluster: str | None) -> list[str]:
    """The statement(s) to run for one migration statement: itself on a single node, or its
    replicated + distributed form on ``cluster`` (see the module docstring)."""
    if cluster is None:
        return [sql]
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cluster):
        raise InvalidInput(f"cluster name {cluster!r} is not a plain identifier")
    on = f"ON CLUSTER {_quote(cluster)}"

    m = _CREATE_TABLE_RE.match(sql)
    if m:
        name = m["name"]
        is_global = name in GLOBAL_TABLES or name == "schema_migrations"
        local = name if is_global else f"{name}_local"
        shard = "all" if is_global else "{shard}"
        path = _quote(f"/clickhouse/tables/{shard}/{{database}}/{local}")

        def engine(em: re.Match[str]) -> str:
            args = [path, "'{replica}'"]
            if em["args"]:
                args.append(em["args"])
            return f"ENGINE = Replicated{em['engine']}({', '.join(args)})"

        body = sql[m.end() :]
        body = _ENGINE_RE.sub(engine, body, count=1)
        body = body.replace(
            "non_replicated_deduplication_window", "replicated_deduplication_window"
        )
        out = [f"CREATE TABLE IF NOT EXISTS {local} {on}{body}"]
        if not is_global:
            out.append(
                f"CREATE TABLE IF NOT EXISTS {name} {on} AS {local}\n"
                f"ENGINE = Distributed({_quote(cluster)}, currentDatabase(), {local}, "
                f"{SHARDING_KEY})"
            )
        return out

    m = _CREATE_MV_RE.match(sql)
    if m:
        body = _FROM_RE.sub(lambda fm: f"FROM {fm['name']}_local", sql[m.end() :])
        return [
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {m['name']} {on} "
            f"TO {m['target']}_local AS{body}"
        ]

    m = _ALTER_RE.match(sql)
    if m:
        name, rest = m["name"], sql[m.end() :]
        if name in GLOBAL_TABLES:
            return [f"ALTER TABLE {name} {on}{rest}"]
        out = [f"ALTER TABLE {name}_local {on}{rest}"]
        if _COLUMN_ALTER_RE.match(rest):
            # the Distributed table has the columns too (inserts name them); TTLs, settings
            # and the like belong to the storage only
            out.append(f"ALTER TABLE {name} {on}{rest}")
        return out

    raise InvalidInput(f"cannot render for a cluster, unknown statement: {sql[:80]!r}")


def migrations_table_ddl(cluster: str | None) -> list[str]:
    return render(MIGRATIONS_TABLE_DDL, cluster)
