"""The API's request and response models (what /docs shows)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from mediagen.core.webhooks import EVENTS

MAX_PROMPT = 2000
NO_NUL = r"^[^\x00]*$"
# Something to draw: at least one character that is not ASCII white space, and no NUL. Expressed as a
# pattern (not by stripping) so that the OpenAPI document says exactly what is accepted.
SOME_TEXT = r"^[^\x00]*[^\x00\t\n\r\x0b\x0c ][^\x00]*$"


def _integral(value: Any) -> Any:
    """JSON has one number type: 512.0 is the integer 512 (JSON Schema agrees); strings stay wrong."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]


WEBHOOK_URL = r"^https?://[A-Za-z0-9.:\[\]-]+(/[!-~]*)?$"
WebhookEvent = Literal["running", "progress", "retrying", "succeeded", "failed", "canceled"]


def _url(value: str) -> str:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ValueError("must have a valid port") from None
    if not parts.hostname:
        raise ValueError("must name a host")
    return value


WebhookUrl = Annotated[str, StringConstraints(max_length=2000, pattern=WEBHOOK_URL), AfterValidator(_url)]


def _storable(value: str) -> str:
    """Text PostgreSQL can store: valid UTF-8 (no lone surrogates) and no NUL characters."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


class GenerationParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    width: Int = Field(1024, ge=64, le=2048, multiple_of=8, description="Pixels; a multiple of 8.")
    height: Int = Field(1024, ge=64, le=2048, multiple_of=8, description="Pixels; a multiple of 8.")
    num_outputs: Int = Field(1, ge=1, le=4)
    seed: Annotated[int, Field(ge=0, le=2**32 - 1), BeforeValidator(_integral)] | None = Field(
        None, description="Chosen at random when absent."
    )
    negative_prompt: (
        Annotated[str, StringConstraints(max_length=MAX_PROMPT, pattern=NO_NUL), AfterValidator(_storable)] | None
    ) = None
    model: str | None = Field(None, description="One of the allowed models; the default when absent.")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[
        str,
        StringConstraints(min_length=1, max_length=MAX_PROMPT, pattern=SOME_TEXT),
        AfterValidator(_storable),
    ]
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    webhook_url: (
        Annotated[str, StringConstraints(max_length=2000, pattern=WEBHOOK_URL), AfterValidator(_url)] | None
    ) = Field(None, description="Where to POST the job's events, signed per Standard Webhooks (see the README).")
    webhook_events: Annotated[list[WebhookEvent], Field(min_length=1, max_length=len(EVENTS))] | None = Field(
        None, description="Events to send to webhook_url; by default the terminal ones (succeeded, failed, canceled)."
    )


class GenerateAccepted(BaseModel):
    job_id: uuid.UUID
    status: str
    status_url: str


class JobStatusResponse(BaseModel):
    job_id: uuid.UUID
    status: str = Field(description="queued, running, retrying, succeeded, failed or canceled")
    attempts: int
    error: str | None
    result_urls: list[str]
    progress: float | None = Field(description="0 to 1 while running (from the model's logs), 1 when succeeded")


class AttemptView(BaseModel):
    number: int
    started_at: datetime
    finished_at: datetime | None
    outcome: str | None
    error_class: str | None
    error_message: str | None
    http_status: int | None
    prediction_id: str | None
    resumed: bool
    gone_prediction_id: str | None = None
    """A prediction this attempt was to resume but Replicate no longer knew (404): replaced by `prediction_id`."""
    retry_delay_seconds: float | None


class OutputView(BaseModel):
    index: int
    url: str
    content_type: str
    size_bytes: int
    sha256: str


class WebhookTry(BaseModel):
    model_config = ConfigDict(extra="allow")

    try_: int = Field(alias="try")
    at: datetime
    status_code: int | None
    error: str | None
    ms: int
    next_try_at: datetime | None


class WebhookDeliveryView(BaseModel):
    id: str = Field(description="The webhook-id header of every try of this delivery")
    event: str
    state: str = Field(description="pending, delivered or failed (given up)")
    tries: int
    created_at: datetime
    finished_at: datetime | None
    next_attempt_at: datetime | None
    history: list[WebhookTry]


class JobView(BaseModel):
    job_id: uuid.UUID
    status: str
    prompt: str
    parameters: dict[str, Any]
    model: str
    attempts: int
    max_attempts: int
    error_class: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    deadline_at: datetime
    progress: float | None = Field(description="0 to 1 while running (from the model's logs), 1 when succeeded")
    attempt_history: list[AttemptView]
    outputs: list[OutputView]
    webhook_deliveries: list[WebhookDeliveryView]


class JobSummary(BaseModel):
    job_id: uuid.UUID
    status: str
    prompt: str
    model: str
    attempts: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class JobPage(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None
