"""metald: hosts, VMs and IP leases.

Revision ID: metald_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "metald_0001"
down_revision = None
branch_labels = ("metald",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metald_hosts",
        sa.Column("host_id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("driver", sa.String(16), nullable=False),
        sa.Column("cpus", sa.Integer, nullable=False),
        sa.Column("memory_bytes", sa.BigInteger, nullable=False),
        sa.Column("capabilities", sa.JSON, nullable=False),
        sa.Column("schedulable", sa.Boolean, nullable=False),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
    )
    op.create_table(
        "metald_vms",
        sa.Column("vm_id", sa.String(40), primary_key=True),
        sa.Column("host_id", sa.String(40), nullable=False),
        sa.Column("deployment_id", sa.String(40), nullable=False),
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("desired", sa.String(16), nullable=False),
        sa.Column("instance_id", sa.String(40), nullable=True),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("memory_bytes", sa.BigInteger, nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("rootfs", sa.Text, nullable=False),
        sa.Column("env", sa.JSON, nullable=False),
        sa.Column("driver", sa.String(16), nullable=True),
        sa.Column("net", sa.JSON, nullable=True),
        sa.Column("runtime", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_metald_vms_host_id", "metald_vms", ["host_id"])
    op.create_index("ix_metald_vms_deployment_id", "metald_vms", ["deployment_id"])
    op.create_index("ix_metald_vms_customer_id", "metald_vms", ["customer_id"])
    op.create_table(
        "metald_ip_leases",
        sa.Column("host_id", sa.String(40), primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True),
        sa.Column("vm_id", sa.String(40), nullable=False, unique=True),
        sa.Column("leased_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("metald_ip_leases")
    op.drop_table("metald_vms")
    op.drop_table("metald_hosts")
