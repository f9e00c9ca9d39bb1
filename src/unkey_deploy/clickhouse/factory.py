"""Build the usage store from settings: chDB at ``<data_dir>/clickhouse`` unless
``billing.clickhouse_url`` names a ClickHouse server (``billing.cluster`` for cluster DDL)."""

from __future__ import annotations

from ..core.config import Settings
from .api import Storage
from .chdb_backend import ChdbStorage
from .server_backend import ServerStorage


def storage_from_settings(settings: Settings, /) -> Storage:
    """The configured backend, not yet migrated (call ``migrate()`` at service start)."""
    billing = settings.billing
    if billing.clickhouse_url:
        return ServerStorage(billing.clickhouse_url, cluster=billing.cluster)
    return ChdbStorage(settings.data_dir / "clickhouse")
