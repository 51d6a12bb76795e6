"""ix_attempts_finished_at (what /usage reads by), built CONCURRENTLY: requests keep writing attempts

Revision 0920_spend used to build it in its own transaction, blocking every write to `attempts` until
the index was done. Databases that ran 0920 that way have it already (IF NOT EXISTS keeps it); the
others get it here.

Revision ID: 0930_finished_at_index
Revises: 0920_spend
Create Date: 2026-12-08 00:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

from online_ddl import create_index_concurrently, drop_index_concurrently

revision: str = "0930_finished_at_index"
down_revision: str | None = "0920_spend"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_index_concurrently("ix_attempts_finished_at", "attempts", "(finished_at)")


def downgrade() -> None:
    drop_index_concurrently("ix_attempts_finished_at")
