"""Tables: jobs (the truth about each job), attempts (one row per try), outputs (stored images), the
clients' webhooks and their deliveries, daily_usage (the spend of jobs retention deleted), and
api_keys (who may call, with what limits, and the secrets their webhooks are signed with)."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.RETRYING)


class AttemptOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # this attempt failed; the job may still retry
    ABANDONED = "abandoned"  # the worker running it died or lost its lease
    CANCELED = "canceled"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _statuses(enum: type[StrEnum]) -> str:
    return ", ".join(f"'{member.value}'" for member in enum)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    input: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """The exact input sent to Replicate (the model's own fields), decided at submit."""
    model: Mapped[str] = mapped_column(Text, nullable=False)
    owner: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    request_hash: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    claim_token: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deadline_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    error_class: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retried_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When an operator last ran the job again (`mediagen retry`): no prediction from before is resumed."""
    progress: Mapped[float | None] = mapped_column(Double)
    """0 to 1 from the running prediction's logs, written when it moves by a step (mediagen.worker.progress)."""
    provider: Mapped[str] = mapped_column(Text, nullable=False, server_default="replicate")
    """The provider the job runs on now: its first route, or the one it failed over to."""
    routes: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    """Each provider that may run the job, in order: `{"provider", "model", "input"}`, the model's name
    and the exact input there, decided at submit (None for jobs from before: Replicate, `input`)."""
    waiting_for: Mapped[str | None] = mapped_column(Text)
    """While running: what the attempt waits for besides its prediction (`provider`: an outage, the
    account's circuit is open). Cleared by the next claim; shown only while the job is running."""
    queue_position: Mapped[int | None] = mapped_column(Integer)
    """While its create waits in the fair queue of the provider's budget (mediagen.providers.fairshare):
    how many creates go before it. Cleared once created, and by the next claim."""

    __table_args__ = (
        CheckConstraint(f"status IN ({_statuses(JobStatus)})", name="status"),
        CheckConstraint("waiting_for IN ('provider')", name="waiting_for"),
        UniqueConstraint("owner", "idempotency_key"),
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_status_created_at_id", "status", "created_at", "id"),
        # The recovery sweep reads only active jobs: keep its index small.
        Index(
            "ix_jobs_active",
            "status",
            "dispatched_at",
            postgresql_where=text("status IN ('queued', 'retrying', 'running')"),
        ),
    )


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    )
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    prediction_id: Mapped[str | None] = mapped_column(Text)
    prediction_status: Mapped[str | None] = mapped_column(Text)
    gone_prediction_id: Mapped[str | None] = mapped_column(Text)
    """The prediction this attempt was to resume but Replicate no longer knew (404); `prediction_id`
    is the one created in its place."""
    resumed: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    create_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(Text)
    error_class: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    http_status: Mapped[int | None] = mapped_column(Integer)
    retry_delay_seconds: Mapped[float | None] = mapped_column(Double)
    predict_time: Mapped[float | None] = mapped_column(Double)
    """Seconds the prediction ran, from its `metrics` (when this attempt saw it end)."""
    image_count: Mapped[int | None] = mapped_column(Integer)
    """Images the prediction made, from its `metrics.image_count` (what Replicate bills per image)."""
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(12, 6))
    """What the prediction cost by mediagen.core.pricing; NULL when unknown."""
    provider: Mapped[str] = mapped_column(Text, nullable=False, server_default="replicate")
    """Who ran this attempt's prediction (`replicate`, `fal`)."""
    failover_from: Mapped[str | None] = mapped_column(Text)
    """The provider the job left for this one (its circuit open, or it refused for capacity)."""

    __table_args__ = (
        UniqueConstraint("job_id", "number"),
        Index("ix_attempts_prediction_id", "prediction_id"),
        Index("ix_attempts_finished_at", "finished_at"),
        CheckConstraint(f"outcome IS NULL OR outcome IN ({_statuses(AttemptOutcome)})", name="outcome"),
    )


class Output(Base):
    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    )
    index: Mapped[int] = mapped_column(Integer, nullable=False)
    storage_key: Mapped[str] = mapped_column(Text, nullable=False)
    content_type: Mapped[str] = mapped_column(Text, nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(Text, nullable=False)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    """Pixels, read from the stored file (None when they could not be read, e.g. most videos)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())

    __table_args__ = (UniqueConstraint("job_id", "index"),)


class JobWebhook(Base):
    """Where a job's events go (`webhook_url` and `webhook_events` of its submit)."""

    __tablename__ = "job_webhooks"

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    url: Mapped[str] = mapped_column(Text, nullable=False)
    events: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # given up


class WebhookDelivery(Base):
    """One event of one job to its webhook: written by a trigger on `jobs` in the transaction that
    changed the job (so no event is lost), sent and retried by the workers (mediagen.worker.delivery_sender)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    )
    event: Mapped[str] = mapped_column(Text, nullable=False)
    job_status: Mapped[str] = mapped_column(Text, nullable=False)
    job_attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    job_error: Mapped[str | None] = mapped_column(Text)
    job_progress: Mapped[float | None] = mapped_column(Double)
    state: Mapped[str] = mapped_column(Text, nullable=False, server_default="pending")
    tries: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False, server_default="[]")
    """One entry a try: when, HTTP status, error, milliseconds, the next try."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(f"state IN ({_statuses(DeliveryState)})", name="state"),
        Index("ix_webhook_deliveries_job_id", "job_id"),
        Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where=text("state = 'pending'")),
    )


class DailyUsage(Base):
    """What the predictions of deleted jobs (retention) cost, summed per UTC day, model and owner,
    and provider, so `/usage` reads the same after the deletion (mediagen.core.usage writes and reads it)."""

    __tablename__ = "daily_usage"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model: Mapped[str] = mapped_column(Text, primary_key=True)
    owner: Mapped[str] = mapped_column(Text, primary_key=True)
    provider: Mapped[str] = mapped_column(Text, primary_key=True, server_default="replicate")
    predictions: Mapped[int] = mapped_column(BigInteger, nullable=False)
    jobs: Mapped[int] = mapped_column(BigInteger, nullable=False)
    images: Mapped[int] = mapped_column(BigInteger, nullable=False)
    predict_seconds: Mapped[float] = mapped_column(Double, nullable=False)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(18, 6), nullable=False)
    unpriced: Mapped[int] = mapped_column(BigInteger, nullable=False)


class ApiKey(Base):
    """An API key issued with `mediagen keys create` (mediagen.core.keys writes it). The key itself is
    never stored, only its SHA-256; the webhook secrets are, as deliveries are signed with them."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    owner: Mapped[str] = mapped_column(Text, nullable=False)
    """What its jobs carry as `jobs.owner`: the same across rotations."""
    key_hash: Mapped[bytes] = mapped_column(BYTEA, nullable=False)
    prefix: Mapped[str] = mapped_column(Text, nullable=False)
    """The key's first characters, to tell keys apart in a list."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Written at most about once a minute per key and API process, never in a request's path."""
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rate_per_minute: Mapped[int | None] = mapped_column(Integer)
    """NULL: MEDIAGEN_RATE_LIMIT_PER_MINUTE (likewise the next two)."""
    max_unfinished_jobs: Mapped[int | None] = mapped_column(Integer)
    daily_spend_cap_usd: Mapped[Decimal | None] = mapped_column(Numeric(12, 6))
    webhook_secret: Mapped[str] = mapped_column(Text, nullable=False)
    previous_webhook_secret: Mapped[str | None] = mapped_column(Text)
    """The secret before the last rotation, still signing until `previous_webhook_secret_until`."""
    previous_webhook_secret_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("key_hash"),
        UniqueConstraint("owner"),
        # A name is one key's at a time; a revoked key's name may be given again.
        Index("ix_api_keys_name_active", "name", unique=True, postgresql_where=text("revoked_at IS NULL")),
        CheckConstraint("rate_per_minute IS NULL OR rate_per_minute >= 0", name="rate_per_minute"),
        CheckConstraint("max_unfinished_jobs IS NULL OR max_unfinished_jobs >= 0", name="max_unfinished_jobs"),
        CheckConstraint("daily_spend_cap_usd IS NULL OR daily_spend_cap_usd > 0", name="daily_spend_cap_usd"),
    )
