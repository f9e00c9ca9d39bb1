"""Embedded ClickHouse (chDB): the default usage store.

**One process owns the path.** chDB keeps the database in-process; a second process opening the
same path fails (``Error initializing EmbeddedServer``), so the billing service opens it and serves
queries for everyone else (gatewayd, the CLI) over its API. Within the process one connection is
shared and every call holds the storage's lock (chDB connections are not thread-safe).

Inserts go through Arrow with no copy to bytes: ``INSERT INTO t (cols) SELECT cols FROM
Python(arrow_tbl)``, where chDB reads the local variable ``arrow_tbl`` of the calling frame
(measured ~2.3 M rows/s, see ``notes/billing.md``). Settings (dedup token) go in the INSERT's
``SETTINGS`` clause.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import chdb
import pyarrow as pa

from ..core.errors import InvalidInput, Unavailable
from .sqlstorage import SqlStorage

# chDB allows one open connection per process (it is one embedded server); track the path so a
# second ChdbStorage on another path fails with a clear error instead of a confusing one.
_OPEN: dict[str, int] = {}
_OPEN_LOCK = threading.Lock()


_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"})


def _literal(value: Any) -> str:
    """A value as ClickHouse text for chDB's query parameters (it passes them through as text:
    top-level strings raw, values inside arrays quoted)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float | Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        # parameter values are parsed in ClickHouse's escaped (TSV) format
        return value.translate(_TSV_ESCAPES)
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ",".join(_quoted(v) for v in value) + "]"
    raise InvalidInput(f"unsupported query parameter type {type(value).__name__}")


def _quoted(value: Any) -> str:
    if isinstance(value, str | datetime | date):
        # _literal already escaped backslashes and control characters; add the quote escape
        return "'" + _literal(value).replace("'", "\\'") + "'"
    return _literal(value)


def settings_clause(settings: Mapping[str, Any] | None) -> str:
    if not settings:
        return ""
    parts = []
    for k, v in settings.items():
        if not k.replace("_", "").isalnum():
            raise InvalidInput(f"bad setting name {k!r}")
        parts.append(f"{k} = {_quoted(v)}")
    return " SETTINGS " + ", ".join(parts)


class ChdbStorage(SqlStorage):
    """chDB at ``path`` (created if missing). Close it to let another process open the path."""

    def __init__(self, path: Path | str, /) -> None:
        super().__init__(cluster=None)
        self.path = Path(path)
        key = str(self.path.resolve())
        with _OPEN_LOCK:
            if _OPEN and key not in _OPEN:
                raise Unavailable(
                    f"chDB is already open in this process at {next(iter(_OPEN))}; "
                    f"one process can hold one chDB path",
                    retryable=False,
                )
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                # chdb and chdb-core both ship chdb/__init__.py: which one wins depends on the
                # install order, and only one of them declares connect() untyped
                self._conn = chdb.connect(key)  # type: ignore[no-untyped-call,unused-ignore]
            except Exception as exc:
                raise Unavailable(
                    f"cannot open chDB at {key}: {exc}",
                    suggestion="another process probably owns this path; stop it or use "
                    "billing.clickhouse_url to reach a ClickHouse server",
                    retryable=True,
                ) from exc
            _OPEN[key] = _OPEN.get(key, 0) + 1
        self._key = key
        self._closed = False

    def _run(self, sql: str, fmt: str, params: Mapping[str, Any] | None = None) -> Any:
        if self._closed:
            raise Unavailable("chDB storage is closed", retryable=False)
        text_params = {k: _literal(v) for k, v in (params or {}).items()} or None
        try:
            return self._conn.query(sql, fmt, params=text_params)
        except Exception as exc:  # chDB raises its own ChdbError/RuntimeError with the code
            raise InvalidInput(f"ClickHouse rejected the statement: {exc}") from exc

    def _exec(self, sql: str, settings: Mapping[str, Any] | None = None) -> None:
        self._run(sql + settings_clause(settings), "CSV")

    def _select(self, sql: str, params: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._select_arrow(sql, params).to_pylist()
        return rows

    def _select_arrow(self, sql: str, params: Mapping[str, Any] | None) -> pa.Table:
        result = self._run(sql, "ArrowTable", params)
        if not isinstance(result, pa.Table):
            raise InvalidInput("statement returned no result set")
        return result

    def _insert_arrow(
        self, table_name: str, tbl: pa.Table, settings: Mapping[str, Any] | None
    ) -> None:
        cols = ", ".join(tbl.column_names)
        # chDB resolves Python(arrow_tbl) from this frame's locals: keep the name.
        arrow_tbl = tbl  # noqa: F841
        # table and column names come from our schemas, never from input
        parts = ["INSERT INTO", table_name, f"({cols}){settings_clause(settings)}"]
        sql = " ".join([*parts, "SELECT", cols, "FROM Python(arrow_tbl)"])
        self._run(sql, "CSV")

    def close(self) -> None:
        with self._lock, _OPEN_LOCK:
            if self._closed:
                return
            self._closed = True
            self._conn.close()
            n = _OPEN.get(self._key, 0) - 1
            if n <= 0:
                _OPEN.pop(self._key, None)
            else:
                _OPEN[self._key] = n
