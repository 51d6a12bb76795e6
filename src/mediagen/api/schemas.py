"""The API's contract: its request and response models (what /docs shows), and the error answers.

Every JSON answer is one of these models: the routes build them (mediagen.api.presentation) and
FastAPI serializes what the route declares, so the OpenAPI document and the answers cannot drift.
"""

from __future__ import annotations

import ipaddress
import uuid
from datetime import date, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from mediagen.core.deliveries import EVENTS

MAX_PROMPT = 2000
# Something to draw: at least one character that is not ASCII white space, and no NUL. Expressed as a
# pattern (not by stripping) so that the OpenAPI document says exactly what is accepted.
SOME_TEXT = r"^[^\x00]*[^\x00\t\n\r\x0b\x0c ][^\x00]*$"


def _iso(value: datetime) -> str:
    return value.isoformat()


Timestamp = Annotated[
    datetime,
    PlainSerializer(_iso, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A time as the API has always written it: ISO 8601 with the offset as `+00:00` (pydantic's own is `Z`)."""


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
    if not _valid_host(parts.hostname):
        raise ValueError("must name a valid host (IDNA: labels of 1 to 63 characters, none starting or ending in -)")
    return value


def _valid_host(host: str) -> bool:
    """An IP address, or a name the resolver can take: IDNA-encodable (`a..b` is not, and would make
    every delivery fail with a UnicodeError), each label 1-63 characters, no leading or trailing hyphen."""
    if host.startswith("[") or ":" in host:
        return True  # an IPv6 literal: urlsplit has checked it
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = encoded.removesuffix(".").split(".")
    return (
        len(encoded) <= 253
        and all(0 < len(label) <= 63 and not label.startswith("-") for label in labels)
        and all(not label.endswith("-") for label in labels)
    )


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


def _storable_json(value: Any) -> Any:
    """Every string in a JSON value must be storable text (the parameters are kept in JSONB)."""
    if isinstance(value, str):
        _storable(value)
    elif isinstance(value, list):
        for item in value:
            _storable_json(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key)
            _storable_json(item)
    return value


class GenerationParameters(BaseModel):
    """The model's own inputs (see `GET /models`: each model's JSON Schema), checked against its schema.

    Besides them: `model`, and the portable `width`/`height` (mapped onto the model's own size inputs
    when a size it makes matches exactly) and `num_outputs` (1 is accepted by single-output models).
    An input the model does not declare is a 422: Replicate would silently ignore it.
    """

    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra={"additionalProperties": True},
    )

    model: str | None = Field(None, description="One of the allowed models; the default when absent.")
    provider: str | None = Field(
        None,
        description="Pin the job to this provider (see `GET /models`: each model's routes): it never fails over, "
        "and it may take that provider's own inputs. Absent: the order of preference, portable inputs only.",
    )
    lane: Literal["interactive", "batch"] | None = Field(
        None,
        description="When the account's budget of creates is the bottleneck: `interactive` jobs are created "
        "before `batch` ones (the default); a key may have a few interactive jobs unfinished at once (429 beyond).",
    )

    @model_validator(mode="after")
    def _extras_storable(self) -> GenerationParameters:
        _storable_json(self.model_extra or {})
        return self


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
    """The job's status object: `GET /status/{id}`, each server-sent event's data, a webhook's body."""

    job_id: uuid.UUID
    status: str = Field(description="queued, running, retrying, succeeded, failed or canceled")
    attempts: int
    error: str | None
    result_urls: list[str]
    progress: float | None = Field(description="0 to 1 while running (from the model's logs), 1 when succeeded")
    waiting_for: Literal["provider"] | None = Field(
        None,
        description="while running: what the job waits for besides its prediction; `provider`: Replicate is "
        "down for every worker (an outage), and the job waits, spending no attempt, until it is back",
    )
    queue_position: int | None = Field(
        None,
        description="while running and waiting for the account's budget of creates (shared fairly by API keys): "
        "how many creates go before this job's (0: it is next); null when it does not wait there or is not known",
    )


class WaitedJob(JobStatusResponse):
    """`POST /generate` with `Prefer: wait=N`, the job finished in time: its status object and its URL."""

    status_url: str


class AttemptView(BaseModel):
    number: int
    started_at: Timestamp
    finished_at: Timestamp | None
    outcome: str | None
    error_class: str | None
    error_message: str | None
    http_status: int | None
    prediction_id: str | None
    resumed: bool
    gone_prediction_id: str | None = None
    """A prediction this attempt was to resume but Replicate no longer knew (404): replaced by `prediction_id`."""
    retry_delay_seconds: float | None
    predict_time: float | None = Field(None, description="Seconds the prediction ran (its metrics)")
    image_count: int | None = Field(None, description="Images the prediction made (its metrics)")
    cost_usd: str | None = Field(None, description="USD, decimal string; null when unknown")
    provider: str = Field("replicate", description="Who ran this attempt's prediction: replicate, fal")
    failover_from: str | None = Field(
        None, description="The provider the job left for this one (its circuit open, or it refused for capacity)"
    )


class OutputView(BaseModel):
    index: int
    url: str
    content_type: str
    size_bytes: int
    sha256: str
    width: int | None = Field(description="Pixels, read from the stored file; null when unknown (e.g. video)")
    height: int | None


class WebhookTry(BaseModel):
    model_config = ConfigDict(extra="allow")

    try_: int = Field(alias="try")
    at: Timestamp
    status_code: int | None
    error: str | None
    ms: int
    next_try_at: Timestamp | None


class WebhookDeliveryView(BaseModel):
    id: str = Field(description="The webhook-id header of every try of this delivery")
    event: str
    state: str = Field(description="pending, delivered or failed (given up)")
    tries: int
    created_at: Timestamp
    finished_at: Timestamp | None
    next_attempt_at: Timestamp | None
    history: list[WebhookTry]


class JobView(BaseModel):
    job_id: uuid.UUID
    status: str
    prompt: str
    parameters: dict[str, Any]
    input: dict[str, Any] | None = Field(description="The exact input sent to the provider the job runs on")
    model: str
    provider: str = Field(
        "replicate", description="The provider the job runs on (its first route, or the one it failed over to)"
    )
    attempts: int
    max_attempts: int
    error_class: str | None
    error: str | None
    created_at: Timestamp
    updated_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    next_attempt_at: Timestamp | None
    deadline_at: Timestamp
    progress: float | None = Field(description="0 to 1 while running (from the model's logs), 1 when succeeded")
    cost_usd: str | None = Field(
        description="What the job's predictions cost (USD, decimal string); null until one ended, or when unknown"
    )
    attempt_history: list[AttemptView]
    outputs: list[OutputView]
    webhook_deliveries: list[WebhookDeliveryView]


class JobSummary(BaseModel):
    job_id: uuid.UUID
    status: str
    prompt: str
    model: str
    attempts: int
    progress: float | None
    result_urls: list[str]
    error: str | None
    created_at: Timestamp
    finished_at: Timestamp | None


class JobPage(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None


class ModelOutput(BaseModel):
    kind: str = Field(description="image or video")
    multiple: bool = Field(description="true: a list of outputs; false: one output per prediction")


class ModelSize(BaseModel):
    model_config = ConfigDict(extra="allow")
    width: int
    height: int


class RouteView(BaseModel):
    provider: str = Field(description="replicate or fal: the value of parameters.provider that pins a job there")
    model: str = Field(description="The model's name at the provider (Replicate's owner/name, fal's endpoint id)")
    input_schema: dict[str, Any] = Field(description="JSON Schema of the model's inputs at this provider")
    defaults: dict[str, Any] = Field(description="The provider's own defaults")
    service_defaults: dict[str, Any] = Field(description="What mediagen sends there when the client leaves it out")
    price: dict[str, Any] | None = Field(
        description='{"usd": "0.003", "per": "image" | "second" | "megapixel"}, null if unknown'
    )


class ModelView(BaseModel):
    model: str = Field(description="owner/name, the value of parameters.model")
    default: bool = Field(description="the model used when parameters.model is absent")
    version: str | None
    schema_source: str = Field(description="snapshot (shipped with mediagen) or replicate (read from it)")
    input_schema: dict[str, Any] = Field(description="JSON Schema of the model's inputs, enums inline, in x-order")
    defaults: dict[str, Any] = Field(description="the model's own defaults")
    service_defaults: dict[str, Any] = Field(description="what mediagen sends when the client leaves it out")
    sizes: list[ModelSize] = Field(description="width x height this model makes, and the inputs that make each")
    output: ModelOutput
    price: dict[str, Any] | None = Field(description='{"usd": "0.003", "per": "image" | "second"}, null if unknown')
    routes: list[RouteView] = Field(
        default_factory=list,
        description="The providers that serve the model, in order of preference: a job goes to the first and "
        "fails over to the next. The portable width/height, num_outputs, seed and output_format map onto each; "
        "a provider's own inputs need parameters.provider.",
    )


class ModelList(BaseModel):
    models: list[ModelView]


class UsageTotals(BaseModel):
    predictions: int
    jobs: int
    images: int
    predict_seconds: float
    cost_usd: str = Field(description="USD, as a decimal string: the sum of the known costs")
    unpriced_predictions: int = Field(
        description="Predictions whose cost is unknown (no price for the model, or no metric to price): "
        "not in `cost_usd`"
    )


class _Model(BaseModel):
    model: str


class _Key(BaseModel):
    api_key: str = Field(description="The key's owner id (a digest of the key), or anonymous")


class _Day(BaseModel):
    day: date = Field(description="UTC")


class _Provider(BaseModel):
    provider: str = Field(description="Who ran the predictions: replicate, fal")


# The group's name first, then its totals (pydantic orders fields from the last base to the first).
class ModelUsage(UsageTotals, _Model):
    pass


class KeyUsage(UsageTotals, _Key):
    pass


class DayUsage(UsageTotals, _Day):
    pass


class ProviderUsage(UsageTotals, _Provider):
    pass


class UsageReport(BaseModel):
    since: Timestamp
    total: UsageTotals
    by_model: list[ModelUsage]
    by_api_key: list[KeyUsage]
    by_day: list[DayUsage]
    by_provider: list[ProviderUsage] = Field(default_factory=list)


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description='Each dependency: "ok" or "unavailable: <error>"')


class WebhookRelayed(BaseModel):
    """A verified webhook passed on to the worker waiting on the prediction."""

    relayed: Literal[True]


class WebhookIgnored(BaseModel):
    """A verified webhook that changed nothing (Replicate reads only the status code)."""

    ignored: str = Field(description="Why: a duplicate, nobody waits on the job, not a prediction, not relayed")


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No API key, or an unknown one (when API keys are on)"},
    404: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    429: {"model": ErrorResponse, "description": "A per-key limit; see Retry-After and RateLimit"},
    503: {"model": ErrorResponse},
}
"""The error answers of every route behind an API key (`detail` says what went wrong)."""
