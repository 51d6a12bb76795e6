"""what each prediction cost: its metrics (predict_time, image_count) and its price on the attempt

Revision ID: 0920_spend
Revises: 0910_model_input
Create Date: 2026-12-03 09:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0920_spend"
down_revision: str | None = "0910_model_input"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: nothing is rewritten, and attempts from before have no known cost.
    op.add_column("attempts", sa.Column("predict_time", sa.Double(), nullable=True))
    op.add_column("attempts", sa.Column("image_count", sa.Integer(), nullable=True))
    op.add_column("attempts", sa.Column("cost_usd", sa.Numeric(12, 6), nullable=True))
    # ix_attempts_finished_at was built here, in this transaction, holding the lock above: it is
    # revision 0930_finished_at_index now, built CONCURRENTLY (databases already past here have it).


def downgrade() -> None:
    op.drop_column("attempts", "cost_usd")
    op.drop_column("attempts", "image_count")
    op.drop_column("attempts", "predict_time")
