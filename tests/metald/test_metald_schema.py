"""metald's tables are declared twice on purpose: ``metald/models.py`` (what the code uses) and the
Alembic revisions (immutable history: an old revision must keep creating the old schema, so it
cannot import today's models). This test makes the models the checked source of truth: after
migrating a fresh database, Alembic's own autogenerate comparison finds no difference between the
models and the migrated schema (columns, types, nullability, keys, indexes), on SQLite and on
PostgreSQL. A column added to one side only fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from unkey_deploy.metald import models
from unkey_deploy.store import db


def _metald_diffs(engine: Engine, metadata: sa.MetaData = models.metadata) -> list[Any]:
    db.upgrade(engine)
    ours = set(metadata.tables)

    def include_name(name: str | None, type_: str, parent: Any) -> bool:
        # other services' tables live in the same database; compare metald's only
        return type_ != "table" or name in ours

    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_name": include_name,
            },
        )
        return list(compare_metadata(ctx, metadata))


def test_models_match_migrated_sqlite(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'metald.db'}")
    try:
        assert _metald_diffs(engine) == []
    finally:
        engine.dispose()


def test_the_check_sees_a_drift(tmp_path: Path) -> None:
    """Control: a column present in the models but in no revision is reported."""
    drifted = sa.MetaData()
    for table in models.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["metald_vms"].append_column(sa.Column("not_migrated", sa.Integer, nullable=True))
    engine = db.make_engine(f"sqlite:///{tmp_path / 'metald.db'}")
    try:
        diffs = _metald_diffs(engine, drifted)
    finally:
        engine.dispose()
    found = [(d[0], d[2], d[3].name) for d in diffs]
    assert found == [("add_column", "metald_vms", "not_migrated")]


@pytest.mark.postgres
def test_models_match_migrated_postgres(postgres_url: str) -> None:
    engine = db.make_engine(postgres_url)
    try:
        assert _metald_diffs(engine) == []
    finally:
        engine.dispose()
