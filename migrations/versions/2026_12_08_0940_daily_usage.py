"""daily_usage: the spend of jobs that retention deleted, per UTC day, model and owner

A new table: nothing else is locked or rewritten.

Revision ID: 0940_daily_usage
Revises: 0930_finished_at_index
Create Date: 2026-12-08 00:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0940_daily_usage"
down_revision: str | None = "0930_finished_at_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "daily_usage",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("predictions", sa.BigInteger(), nullable=False),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.Column("images", sa.BigInteger(), nullable=False),
        sa.Column("predict_seconds", sa.Double(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(18, 6), nullable=False),
        sa.Column("unpriced", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "model", "owner", name=op.f("pk_daily_usage")),
    )


def downgrade() -> None:
    op.drop_table("daily_usage")
