"""assetmanagerd: assets index, leases, blobs.

Revision ID: assets_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "assets_0001"
down_revision = None
branch_labels = ("assets",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "assets",
        sa.Column("asset_id", sa.String(40), primary_key=True),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("source_image", sa.String(1024), nullable=False),
        sa.Column("manifest_digest", sa.String(80), nullable=False),
        sa.Column("build_id", sa.String(40), nullable=False),
        sa.Column("build_key", sa.String(255), nullable=False),
        sa.Column("tree_bytes", sa.BigInteger, nullable=False),
        sa.Column("ext4_bytes", sa.BigInteger, nullable=False),
        sa.Column("compressed_bytes", sa.BigInteger, nullable=False),
        sa.Column("ext4_sha256", sa.String(64), nullable=False),
        sa.Column("blob_sha256", sa.String(64), nullable=False),
        sa.Column("image_config", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
    )
    op.create_index("ix_assets_build_key", "assets", ["build_key"])
    op.create_index("ix_assets_customer", "assets", ["customer_id"])
    op.create_index("ix_assets_blob", "assets", ["blob_sha256"])
    op.create_table(
        "asset_leases",
        sa.Column("asset_id", sa.String(40), primary_key=True),
        sa.Column("holder", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "asset_blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("unreferenced_since", sa.Float, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("asset_blobs")
    op.drop_table("asset_leases")
    op.drop_table("assets")
