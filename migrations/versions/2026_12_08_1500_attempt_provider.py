"""the provider of each attempt and of each job's route: attempts.provider, attempts.failover_from,
jobs.provider (the route the job runs on now), jobs.routes (each provider's exact input, decided at submit)

Constant defaults and nullable columns: a change of the catalogue only, nothing is rewritten (PostgreSQL
11+ keeps a constant default in the catalogue). Rows from before are Replicate's.

Revision ID: 1500_attempt_provider
Revises: 1410_api_keys
Create Date: 2026-12-08 15:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from online_ddl import alter_table_alone

revision: str = "1500_attempt_provider"
down_revision: str | None = "1410_api_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Each busy table in a transaction of its own (online_ddl.alter_table_alone says why).
    alter_table_alone(
        "jobs",
        "ADD COLUMN IF NOT EXISTS provider text NOT NULL DEFAULT 'replicate'",
        "ADD COLUMN IF NOT EXISTS routes jsonb",
    )
    alter_table_alone(
        "attempts",
        "ADD COLUMN IF NOT EXISTS provider text NOT NULL DEFAULT 'replicate'",
        "ADD COLUMN IF NOT EXISTS failover_from text",
    )
    op.add_column("daily_usage", sa.Column("provider", sa.Text(), nullable=False, server_default="replicate"))
    # One row per day, model, owner and provider: a small table (a row a day per group), rebuilt at once.
    op.drop_constraint("pk_daily_usage", "daily_usage", type_="primary")
    op.create_primary_key("pk_daily_usage", "daily_usage", ["day", "model", "owner", "provider"])


def downgrade() -> None:
    op.drop_constraint("pk_daily_usage", "daily_usage", type_="primary")
    # Before this revision only Replicate was billed: other providers' rolled-up spend has no row to go to.
    op.execute("DELETE FROM daily_usage WHERE provider <> 'replicate'")
    op.create_primary_key("pk_daily_usage", "daily_usage", ["day", "model", "owner"])
    op.drop_column("daily_usage", "provider")
    op.drop_column("jobs", "routes")
    op.drop_column("jobs", "provider")
    op.drop_column("attempts", "failover_from")
    op.drop_column("attempts", "provider")
