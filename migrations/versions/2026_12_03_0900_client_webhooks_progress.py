"""client webhooks (job_webhooks, webhook_deliveries, the trigger that writes them) and jobs.progress

Revision ID: 0100_frontend
Revises: 0002_gone_predictions
Create Date: 2026-12-03 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0100_frontend"
down_revision: str | None = "0002_gone_predictions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A job's event becomes a delivery in the very transaction that changed the job: no event is lost
# between a commit and a send. Jobs without a webhook pay one index lookup per status change.
EVENT_FUNCTION = """
CREATE FUNCTION mediagen_job_webhook_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    wanted text[];
    event text;
BEGIN
    SELECT events INTO wanted FROM job_webhooks WHERE job_id = NEW.id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    event := CASE WHEN NEW.status IS DISTINCT FROM OLD.status THEN NEW.status ELSE 'progress' END;
    IF event = ANY(wanted) THEN
        INSERT INTO webhook_deliveries (job_id, event, job_status, job_attempts, job_error, job_progress)
        VALUES (NEW.id, event, NEW.status, NEW.attempts, NEW.error_message, NEW.progress);
    END IF;
    RETURN NULL;
END $$
"""

EVENT_TRIGGER = """
CREATE TRIGGER jobs_webhook_event AFTER UPDATE OF status, progress ON jobs
FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.progress IS DISTINCT FROM NEW.progress)
EXECUTE FUNCTION mediagen_job_webhook_event()
"""


def upgrade() -> None:
    op.add_column("jobs", sa.Column("progress", sa.Double(), nullable=True))
    op.create_table(
        "job_webhooks",
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("events", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_webhooks_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job_webhooks")),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("job_status", sa.Text(), nullable=False),
        sa.Column("job_attempts", sa.Integer(), nullable=False),
        sa.Column("job_error", sa.Text(), nullable=True),
        sa.Column("job_progress", sa.Double(), nullable=True),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("tries", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=True),
        sa.Column("history", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'delivered', 'failed')", name=op.f("ck_webhook_deliveries_state")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_webhook_deliveries_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index("ix_webhook_deliveries_job_id", "webhook_deliveries", ["job_id"], unique=False)
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.execute(EVENT_FUNCTION)
    op.execute(EVENT_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_webhook_event ON jobs")
    op.execute("DROP FUNCTION mediagen_job_webhook_event()")
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_job_id", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_table("job_webhooks")
    op.drop_column("jobs", "progress")
