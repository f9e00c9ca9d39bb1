"""builderd: structured progress records in the build log.

A ``build_logs`` row with ``progress`` (JSON of ``BuildProgress``) is a progress record; its
``line`` is the human rendering. Rows without it are plain log lines, as before.

Revision ID: builder_0002
Revises: builder_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "builder_0002"
down_revision = "builder_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("build_logs", sa.Column("progress", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("build_logs") as batch:
        batch.drop_column("progress")
