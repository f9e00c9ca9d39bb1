"""metald: the asset a VM was launched from (metald holds a lease on it while the VM exists).

Revision ID: metald_0003
Revises: metald_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "metald_0003"
down_revision = "metald_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("metald_vms", sa.Column("asset_id", sa.String(40), nullable=True))


def downgrade() -> None:
    op.drop_column("metald_vms", "asset_id")
