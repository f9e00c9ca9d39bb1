"""assetmanagerd: blob rows get a state (live/deleting) and the time of their last claim.

A register claims the blob row before storing the blob; gc marks a row ``deleting`` (a
conditional update) before deleting the blob. The row is the point where both serialize.

Revision ID: assets_0002
Revises: assets_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "assets_0002"
down_revision = "assets_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("asset_blobs") as b:
        b.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="live"))
        b.add_column(sa.Column("claimed_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("asset_blobs") as b:
        b.drop_column("claimed_at")
        b.drop_column("state")
