"""what a running job waits for, when it waits on something other than its prediction (the provider)

Revision ID: 1400_waiting_for
Revises: 0940_daily_usage
Create Date: 2026-12-08 14:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from online_ddl import add_check_constraint, alter_table_alone

revision: str = "1400_waiting_for"
down_revision: str | None = "0940_daily_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: a change of the catalogue only, nothing is rewritten; the check is validated
    # without holding up requests.
    alter_table_alone("jobs", "ADD COLUMN IF NOT EXISTS waiting_for text")
    add_check_constraint("ck_jobs_waiting_for", "jobs", "waiting_for IN ('provider')")


def downgrade() -> None:
    op.drop_constraint("waiting_for", "jobs", type_="check")
    op.drop_column("jobs", "waiting_for")
