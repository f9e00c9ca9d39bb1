"""metald: hosts can be declared lost; a lost VM names its replacement.

Revision ID: metald_0002
Revises: metald_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "metald_0002"
down_revision = "metald_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("metald_hosts", sa.Column("lost_at", sa.Float, nullable=True))
    op.add_column("metald_vms", sa.Column("replaced_by", sa.String(40), nullable=True))


def downgrade() -> None:
    op.drop_column("metald_vms", "replaced_by")
    op.drop_column("metald_hosts", "lost_at")
