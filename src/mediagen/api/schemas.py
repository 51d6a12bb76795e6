"""The API's request and response models (what /docs shows)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

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
    attempt_history: list[AttemptView]
    outputs: list[OutputView]


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
