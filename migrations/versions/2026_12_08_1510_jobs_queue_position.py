"""a running job's place in the fair queue of the provider's create budget, while it waits there

Revision ID: 1510_queue_position
Revises: 1500_attempt_provider
Create Date: 2026-12-08 15:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "1510_queue_position"
down_revision: str | None = "1500_attempt_provider"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: a change of the catalogue only, nothing is rewritten.
    op.add_column("jobs", sa.Column("queue_position", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "queue_position")
