"""billing: issued invoices (frozen documents) and what each billed per usage month.

Revision ID: billing_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "billing_0001"
down_revision = None
branch_labels = ("billing",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "billing_invoices",
        sa.Column("number", sa.String(32), primary_key=True),
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("total", sa.String(32), nullable=False),
        sa.Column("credits_applied", sa.String(32), nullable=False),
        sa.Column("credit_added", sa.String(32), nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.UniqueConstraint("customer_id", "month", name="uq_billing_invoices_customer_month"),
    )
    op.create_table(
        "billing_invoice_usage",
        sa.Column("number", sa.String(32), nullable=False),
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("period", sa.String(7), nullable=False),
        sa.Column("pricing_version", sa.String(16), nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("item", sa.String(16), nullable=False),
        sa.Column("usage", sa.String(48), nullable=False),
        sa.Column("amount", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("number", "period", "pricing_version", "tier", "item"),
    )
    op.create_index(
        "ix_billing_invoice_usage_customer", "billing_invoice_usage", ["customer_id", "period"]
    )


def downgrade() -> None:
    op.drop_index("ix_billing_invoice_usage_customer", "billing_invoice_usage")
    op.drop_table("billing_invoice_usage")
    op.drop_table("billing_invoices")
