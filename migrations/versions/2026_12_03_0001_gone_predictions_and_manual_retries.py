"""gone predictions and manual retries

A prediction that answers 404 on resume is replaced within the same attempt (attempts.gone_prediction_id
keeps the lost one); `mediagen retry` stamps jobs.retried_at, and no prediction from before it is resumed.

Revision ID: 0002_gone_predictions
Revises: 0001
Create Date: 2026-12-03 07:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_gone_predictions"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("attempts", sa.Column("gone_prediction_id", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("retried_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "retried_at")
    op.drop_column("attempts", "gone_prediction_id")
