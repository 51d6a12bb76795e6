"""the exact input sent to Replicate on each job; each output's pixel size

Revision ID: 0910_model_input
Revises: 0100_frontend
Create Date: 2026-12-03 09:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0910_model_input"
down_revision: str | None = "0100_frontend"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: adding them rewrites nothing, and jobs from before keep a NULL input
    # (the worker then builds it from the parameters as it always did).
    op.add_column("jobs", sa.Column("input", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column("outputs", sa.Column("width", sa.Integer(), nullable=True))
    op.add_column("outputs", sa.Column("height", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("outputs", "height")
    op.drop_column("outputs", "width")
    op.drop_column("jobs", "input")
