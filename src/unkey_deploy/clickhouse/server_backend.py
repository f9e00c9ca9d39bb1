"""A ClickHouse server (or cluster) by URL, through clickhouse-connect.

Uses only ``client.command``, ``client.query``, ``client.query_arrow`` and ``client.insert_arrow``
(the subset the tests' recording double implements). Parameters are bound server-side
(``{name:Type}`` placeholders), never formatted into SQL. Settings such as
``insert_deduplication_token`` travel per request.

With ``cluster`` set, migrations render to ``ON CLUSTER`` DDL with Replicated*/Distributed
engines (``schema.render``) and inserts into Distributed tables are synchronous
(``distributed_foreground_insert=1``) so that "committed" means stored on the shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import clickhouse_connect
import pyarrow as pa

from ..core.errors import InvalidInput, Unavailable, UnkeyError
from .sqlstorage import SqlStorage


class ClickHouseClient(Protocol):
    """The part of ``clickhouse_connect.driver.client.Client`` this backend uses."""

    def command(
        self,
        cmd: str,
        parameters: Any = None,
        data: Any = None,
        settings: dict[str, Any] | None = None,
    ) -> Any: ...

    def query(
        self, query: str, parameters: Any = None, settings: dict[str, Any] | None = None
    ) -> Any: ...

    def query_arrow(
        self, query: str, parameters: Any = None, settings: dict[str, Any] | None = None
    ) -> Any: ...

    def insert_arrow(
        self,
        table: str,
        arrow_table: Any,
        database: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Any: ...

    def close(self) -> None: ...


def client_from_url(url: str) -> ClickHouseClient:
    """``http(s)://user:pass@host:port/database`` -> a clickhouse-connect client."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            f"billing.clickhouse_url must be http(s)://user:pass@host:port/db, got {url!r}"
        )
    database = parts.path.strip("/") or None
    try:
        client: ClickHouseClient = clickhouse_connect.get_client(
            host=parts.hostname,
            port=parts.port or (8443 if parts.scheme == "https" else 8123),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password or ""),
            database=database,
            secure=parts.scheme == "https",
        )
    except Exception as exc:
        raise Unavailable(f"cannot reach ClickHouse at {parts.hostname}: {exc}") from exc
    return client


class ServerStorage(SqlStorage):
    """A ClickHouse server. ``client`` may be injected (tests); otherwise built from ``url``."""

    def __init__(
        self,
        url: str | None = None,
        /,
        *,
        cluster: str | None = None,
        client: ClickHouseClient | None = None,
    ) -> None:
        super().__init__(cluster=cluster)
        if client is None:
            if url is None:
                raise InvalidInput("ServerStorage needs a url or a client")
            client = client_from_url(url)
        self._client = client

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except UnkeyError:
            raise
        except Exception as exc:
            # clickhouse-connect raises DatabaseError for server-side errors (bad SQL, ...) and
            # OperationalError for transport failures; the latter are worth retrying.
            name = type(exc).__name__
            if name == "OperationalError":
                raise Unavailable(f"ClickHouse is unreachable: {exc}") from exc
            raise InvalidInput(f"ClickHouse rejected the statement: {exc}") from exc

    def _exec(self, sql: str, settings: Mapping[str, Any] | None = None) -> None:
        self._call(self._client.command, sql, settings=dict(settings) if settings else None)

    def _select(self, sql: str, params: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        result = self._call(self._client.query, sql, parameters=dict(params or {}) or None)
        return [dict(r) for r in result.named_results()]

    def _select_arrow(self, sql: str, params: Mapping[str, Any] | None) -> pa.Table:
        table: pa.Table = self._call(
            self._client.query_arrow, sql, parameters=dict(params or {}) or None
        )
        return table

    def _insert_arrow(
        self, table_name: str, tbl: pa.Table, settings: Mapping[str, Any] | None
    ) -> None:
        self._call(
            self._client.insert_arrow,
            table_name,
            tbl,
            settings=dict(settings) if settings else None,
        )

    def close(self) -> None:
        self._client.close()
