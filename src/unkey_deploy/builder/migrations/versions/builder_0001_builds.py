"""builderd: build records and build logs (the queue itself is the generic jobs table).

Revision ID: builder_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "builder_0001"
down_revision = None
branch_labels = ("builder",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "builds",
        sa.Column("build_id", sa.String(40), primary_key=True),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("image", sa.String(1024), nullable=False),
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("deployment_id", sa.String(40), nullable=True),
        sa.Column("options", sa.Text, nullable=False),
        sa.Column("manifest_digest", sa.String(80), nullable=True),
        sa.Column("asset_id", sa.String(40), nullable=True),
        sa.Column("cached", sa.Boolean, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_builds_job_id", "builds", ["job_id"])
    op.create_index("ix_builds_customer_id", "builds", ["customer_id"])
    op.create_table(
        "build_logs",
        sa.Column("build_id", sa.String(40), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("line", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("build_logs")
    op.drop_table("builds")
