"""api_keys: keys issued with `mediagen keys create`, stored as hashes, each with its limits and webhook secrets

A new table: nothing else is locked or rewritten, and its indexes are built on an empty table.

Revision ID: 1410_api_keys
Revises: 1400_waiting_for
Create Date: 2026-12-08 14:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "1410_api_keys"
down_revision: str | None = "1400_waiting_for"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("key_hash", postgresql.BYTEA(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rate_per_minute", sa.Integer(), nullable=True),
        sa.Column("max_unfinished_jobs", sa.Integer(), nullable=True),
        sa.Column("daily_spend_cap_usd", sa.Numeric(12, 6), nullable=True),
        sa.Column("webhook_secret", sa.Text(), nullable=False),
        sa.Column("previous_webhook_secret", sa.Text(), nullable=True),
        sa.Column("previous_webhook_secret_until", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("rate_per_minute IS NULL OR rate_per_minute >= 0", name=op.f("ck_api_keys_rate_per_minute")),
        sa.CheckConstraint(
            "max_unfinished_jobs IS NULL OR max_unfinished_jobs >= 0", name=op.f("ck_api_keys_max_unfinished_jobs")
        ),
        sa.CheckConstraint(
            "daily_spend_cap_usd IS NULL OR daily_spend_cap_usd > 0", name=op.f("ck_api_keys_daily_spend_cap_usd")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        sa.UniqueConstraint("owner", name=op.f("uq_api_keys_owner")),
    )
    op.create_index(
        "ix_api_keys_name_active",
        "api_keys",
        ["name"],
        unique=True,
        postgresql_where=sa.text("revoked_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
