"""metald: each VM's readiness check (the app.yaml's healthcheck path and port), so the VM's host
probes what the app asked for, whoever waits for it.

Revision ID: metald_0004
Revises: metald_0003
"""

import sqlalchemy as sa
from alembic import op

revision = "metald_0004"
down_revision = "metald_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("metald_vms", sa.Column("health_path", sa.Text, nullable=True))
    op.add_column("metald_vms", sa.Column("health_port", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("metald_vms", "health_port")
    op.drop_column("metald_vms", "health_path")
