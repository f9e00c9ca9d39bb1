"""Usage store (ClickHouse): schema migrations, chDB and server backends, typed queries.

Other services import from :mod:`unkey_deploy.clickhouse.api` (the ``Storage`` Protocol),
:mod:`unkey_deploy.clickhouse.factory` and :mod:`unkey_deploy.clickhouse.queries`.
"""
