"""The API's request and response models (what /docs shows)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

MAX_PROMPT = 2000


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError("must be a multiple of 8")
    return value


class GenerationParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    width: int = Field(1024, ge=64, le=2048, description="Pixels; a multiple of 8.")
    height: int = Field(1024, ge=64, le=2048, description="Pixels; a multiple of 8.")
    num_outputs: int = Field(1, ge=1, le=4)
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Chosen at random when absent.")
    negative_prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT)] | None = None
    model: str | None = Field(None, description="One of the allowed models; the default when absent.")

    _check_width = field_validator("width", "height")(_multiple_of_8)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT)]
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
