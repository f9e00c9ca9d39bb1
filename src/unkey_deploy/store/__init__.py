"""Control-plane state: SQLAlchemy 2 engine/session and Alembic migrations.

SQLite (WAL) by default, PostgreSQL by URL. Every service that keeps state declares its tables on
:data:`unkey_deploy.store.db.Base` in its own module and ships its Alembic revisions in its own
``<service>/migrations/`` folder as a separate branch (``branch_labels = ("<service>",)``);
:func:`unkey_deploy.store.db.upgrade` applies every branch's head.
"""
