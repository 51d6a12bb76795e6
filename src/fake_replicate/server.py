"""Fake Replicate HTTP server: the real, unmodified ``replicate==1.0.7`` client works against it.

``create_app(FakeConfig(...), data_dir=...)`` returns a Starlette app. Run it with
``python -m fake_replicate`` (see that module) or mount it in tests.
Its state lives on ``app.state.fake`` (one process, asyncio only). A prediction
has no background task: its status is computed from its timestamps whenever it
is read, so thousands of predictions in flight cost nothing. With a data
directory, predictions are also kept on disk and found again after a restart,
finished or not (:mod:`fake_replicate.store`); without one, in memory only.

Replicate routes (see docs ``replicate-api.md`` sections 1 and 2.8)
-------------------------------------------------------------------
``POST /v1/models/{owner}/{name}/predictions``       body ``{"input": {...}}``
``POST /v1/deployments/{owner}/{name}/predictions``  body ``{"input": {...}}``
``POST /v1/predictions``                             body ``{"version", "input"}``
    ``version`` may be a bare id or ``owner/name:id``. Create answers 201 with a
    ``Location`` header. ``Prefer: wait[=N]`` (N <= 60, default 60) holds the
    request until the prediction is terminal or N s pass; an unfinished
    prediction is then returned as ``starting`` (never ``processing``), and
    ``Preference-Applied: wait`` is sent. A model whose owner is ``missing``
    answers 404.
``GET /v1/predictions/{id}``, ``POST /v1/predictions/{id}/cancel``
``GET /v1/predictions[?cursor=...]``  newest first, 100 per page, ``next`` is an absolute URL.
``GET /v1/models/{owner}/{name}`` and ``GET /v1/models/{owner}/{name}/versions/{id}``
``GET /v1/webhooks/default/secret``   ``{"key": "whsec_..."}``: the key the webhooks are signed with.
    A create with ``webhook`` gets signed webhooks as the prediction runs (see ``fake_replicate.webhooks``).
``GET /files/{prediction_id}/out-{index}.{format}``  an output file (no auth needed;
    ``/files/{id}/{index}.png``, the old name, still answers)

Rate limits (off by default): ``create_rate_per_minute`` / ``request_rate_per_minute`` with bursts,
answered 429 as Replicate does (see ``fake_replicate.limits``).

Auth: ``Authorization: Bearer X`` or ``Token X``. A missing header answers 401;
when ``FakeConfig.api_token`` is set any other token answers 401 too.

Models (``fake_replicate.models``): flux-schnell, flux-dev, flux-1.1-pro and
stable-diffusion-3.5-large as Replicate describes them (shared/replicate-models.md),
plus ``fake/tiny-video`` (one tiny real MP4). Each has its own Input schema (served
at the models endpoints in Cog's shape, enums behind ``$ref``), validates like
Replicate (422 ``Input validation failed`` with ``invalid_fields``; unknown input
keys ignored, unknown keys of the request body itself refused), renders its
``output_format`` (WebP by default; PNG, JPEG) at the
size its ``aspect_ratio``/``megapixels`` (or custom ``width``/``height``) make, and
answers a list of URLs (flux-schnell, flux-dev) or one URL (flux-1.1-pro, SD3.5,
the video model), named ``{base}/files/{id}/out-{i}.{format}``. Any other model
name gets the generic stand-in: ``width``/``height`` (1..4096, default 1024),
``num_outputs`` (1..4), ``seed``, ``negative_prompt``, PNG, a list. Images are real:
a two-colour gradient chosen from a 64-entry palette by a hash of (prompt, seed,
index), cached by (width, height, palette entry, format), marked with the
prediction and index so every file's bytes differ. ``data`` output mode gives
``data:<type>;base64,`` strings instead.

Timing: a prediction is ``starting`` for ``min(0.1 * latency, 0.5)`` s, then
``processing`` (with tqdm-style progress lines in ``logs``), then terminal at
``latency`` s. With latency 0 the create response is already terminal.

Fault injection (``FakeConfig``, global and probabilistic)
---------------------------------------------------------
``latency`` / ``latency_jitter``  seconds from create to terminal, +- a fraction.
``create_latency``  seconds slept before a create is handled.
``p_create_429`` / ``p_create_500``  create answers 429 (``Retry-After`` header and
    body ``retry_after`` = ``retry_after``) or 500; nothing is created.
``p_get_429`` / ``p_get_503``  ``GET /v1/predictions/{id}`` and the list answer
    429/503; state is unchanged. (The client retries GETs on 429/503 itself.)
``p_flagged``  the prediction fails with "The input or output was flagged as
    sensitive. (E005)".
``p_model_error``  the prediction fails with "CUDA out of memory ... (E001)".
``seed``  seeds the RNG used for the probabilities, ids and jitter.
``output_mode``  ``url`` (default) or ``data``.  ``api_token``  see Auth.
``base_url``  overrides the scheme://host[:port] used in URLs (default: the request's).

Per-prompt directives (deterministic, for tests)
------------------------------------------------
Written anywhere in the prompt as ``[[...]]``; the prompt is otherwise used as
given (the directives stay in ``input.prompt``). Counters are kept per exact
prompt string, so tests with unique prompts do not interfere. ``*N`` means "the
first N times"; without it the directive always applies.

``[[create:500*N]]``  the first N creates with this prompt answer 500 (likewise
    any 4xx/5xx code, e.g. 402, 502, 503). Nothing is created. 502 has a
    non-JSON (HTML) gateway body, as the real one does; the others are JSON.
``[[create:429*N:retry_after=S]]``  429 with ``Retry-After: S`` and body
    ``retry_after`` S. Several create directives are consumed in order.
``[[get:503*N]]``  the first N GETs of each such prediction answer 503 (also 429,
    500, 504...). Remember the client itself retries GET on 429/503/504.
``[[flagged]]``  the prediction ends failed with the E005 message.
``[[fail*N]]``  the first N predictions for this prompt end failed with
    "Prediction failed: the model timed out while starting (E6716)"; later ones succeed.
``[[invalid]]``  create answers 422 "Input validation failed" (``input.prompt``).
``[[latency=S]]``  per-prompt latency.
``[[hang_create=S]]`` / ``[[hang_create=S*N]]``  the prediction IS created at once
    but the create response is delayed S seconds (for the first N creates).
``[[output:404]]``  the output file URLs answer 404.
``[[output:notimage]]``  the file route answers 200 ``text/html`` ``<html>``.
``[[output:data]]`` / ``[[output:url]]``  force the output mode for this prompt.
``[[nsfw:N]]``  N images are flagged: flux drops them from its output (logs say
    ``Total safe images: K out of M``) and fails when all are; the API-proxy models
    (flux-1.1-pro, SD3.5) fail with the E005 message.

Control and inspection routes (not Replicate's; no auth)
--------------------------------------------------------
``GET /_fake/config``   the live FakeConfig as JSON.
``PUT /_fake/config``   JSON merge into the live FakeConfig (400 on unknown keys or
    bad values); applies to requests from then on. Answers the new config.
``POST /_fake/reset``   drop predictions (also on disk) and counters (config kept, RNG reseeded).
``GET /_fake/stats``    ``{"creates": create requests, "predictions": created,
    "by_prompt": {prompt: predictions created}, "statuses": {status: count},
    "requests": {...}, "faults": {...}}``.
``GET /_fake/health``   ``{"ok": true}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fake_replicate.config import FakeConfig, config_with
from fake_replicate.directives import Directives, create_fault_for, first_n_applies, parse_directives
from fake_replicate.images import PngCache, mark, palette_index
from fake_replicate.limits import RateLimits
from fake_replicate.models import GENERIC, MODELS, ModelSpec, openapi_schema, plan, spec_for, validate
from fake_replicate.store import PredictionStore
from fake_replicate.video import TINY_MP4
from fake_replicate.webhooks import WebhookSender

__all__ = ["FakeReplicate", "create_app"]

JSON = dict[str, Any]
Status = Literal["starting", "processing", "succeeded", "failed", "canceled"]

TERMINAL: Final = frozenset({"succeeded", "failed", "canceled"})
BODY_KEYS: Final = frozenset({"version", "input", "webhook", "webhook_completed", "webhook_events_filter", "stream"})
PAGE_SIZE: Final = 100
MAX_WAIT: Final = 60.0
PROGRESS_STEPS: Final = 4
FLAGGED_ERROR: Final = "The input or output was flagged as sensitive. (E005)"
NSFW_ERROR: Final = "All generated images contained NSFW content. Try running it again with a different prompt."
CRASH_ERROR: Final = "Prediction failed: the model timed out while starting (E6716)"
OOM_ERROR: Final = "CUDA out of memory. Tried to allocate 2.00 GiB; GPU 0 has a total capacity of 23.69 GiB (E001)"
WEBHOOK_SECRET: Final = (
    "whsec_" + base64.b64encode(hashlib.sha256(b"mediagen-fake-replicate-webhook").digest()).decode()
)
ERROR_TITLES: Final[Mapping[int, str]] = {
    400: "Bad Request",
    401: "Unauthenticated",
    402: "Insufficient credit",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
BAD_GATEWAY_HTML: Final = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)


# --------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Params:
    """The validated model inputs, and what the model makes of them (fake_replicate.models)."""

    prompt: str
    width: int
    height: int
    num_outputs: int
    seed: int | None
    spec: ModelSpec = GENERIC
    format: str = "png"
    flagged: int = 0
    """Images flagged NSFW (the ``[[nsfw:N]]`` directive), dropped from the output by flux."""

    @property
    def kept(self) -> int:
        return max(self.num_outputs - self.flagged, 0)


class Prediction:
    """One prediction; its status is derived from its timestamps when read."""

    __slots__ = (
        "canceled_after",
        "created_mono",
        "created_wall",
        "directives",
        "done_event",
        "error",
        "get_faults_left",
        "id",
        "input",
        "latency",
        "model",
        "outcome",
        "output_mode",
        "params",
        "start_delay",
        "version",
    )

    def __init__(
        self,
        *,
        id: str,
        model: str,
        version: str,
        input: JSON,
        params: Params,
        directives: Directives,
        output_mode: str,
        latency: float,
        outcome: Status,
        error: str | None,
        created_wall: float | None = None,
    ) -> None:
        self.id = id
        self.model = model
        self.version = version
        self.input = input
        self.params = params
        self.directives = directives
        self.output_mode = output_mode
        now_wall = time.time()
        self.created_wall = now_wall if created_wall is None else created_wall
        # A prediction read back after a restart keeps its age: its status goes on from its timestamps.
        self.created_mono = time.monotonic() - (now_wall - self.created_wall)
        self.latency = latency
        self.start_delay = min(0.1 * latency, 0.5)
        self.outcome: Status = outcome
        self.error = error
        self.canceled_after: float | None = None
        self.get_faults_left: list[int | None] = [f.count for f in directives.get_faults]
        self.done_event: asyncio.Event | None = None

    def elapsed(self, now: float) -> float:
        return now - self.created_mono

    def status(self, now: float) -> Status:
        if self.canceled_after is not None:
            return "canceled"
        elapsed = self.elapsed(now)
        if elapsed >= self.latency:
            return self.outcome
        if elapsed >= self.start_delay:
            return "processing"
        return "starting"

    def remaining(self, now: float) -> float:
        """Seconds until the prediction is terminal (0 if it is)."""
        if self.canceled_after is not None:
            return 0.0
        return max(0.0, self.latency - self.elapsed(now))

    def cancel(self, now: float) -> bool:
        """Cancel unless terminal already; whether it was canceled now."""
        if self.status(now) in TERMINAL:
            return False
        self.canceled_after = self.elapsed(now)
        if self.done_event is not None:
            self.done_event.set()
        return True

    async def wait(self, seconds: float) -> None:
        """Sleep until terminal (or canceled) or ``seconds`` pass."""
        remaining = self.remaining(time.monotonic())
        if remaining <= 0 or seconds <= 0:
            return
        if self.done_event is None:
            self.done_event = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            # A few ms of slack so the status is terminal when we wake up.
            await asyncio.wait_for(self.done_event.wait(), timeout=min(remaining + 0.002, seconds))

    def next_get_fault(self) -> int | None:
        """Consume and return the status of the next ``[[get:...]]`` fault, if any."""
        for i, left in enumerate(self.get_faults_left):
            if left is None:
                return self.directives.get_faults[i].status
            if left > 0:
                self.get_faults_left[i] = left - 1
                return self.directives.get_faults[i].status
        return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _progress_line(step: int) -> str:
    pct = step * 100 // PROGRESS_STEPS
    bar = ("\u2588" * (step * 10 // PROGRESS_STEPS)).ljust(10)
    return f"{pct:3d}%|{bar}| {step}/{PROGRESS_STEPS} [00:00<00:00, 4.00it/s]"


def _logs(pred: Prediction, status: Status, elapsed: float) -> str:
    """Like the real model's: tqdm bars where it writes them (the flux fp8 path), NSFW counts where it drops."""
    if status == "starting":
        return ""
    params = pred.params
    seed = params.seed if params.seed is not None else int(pred.id[:6], 36) % 100000
    lines = [f"Using seed: {seed}"]
    run_time = max(pred.latency - pred.start_delay, 1e-9)
    if status in ("succeeded",):
        steps = PROGRESS_STEPS
    else:
        steps = min(PROGRESS_STEPS, int(PROGRESS_STEPS * (elapsed - pred.start_delay) / run_time))
    if params.spec.progress:
        lines += [_progress_line(i) for i in range(max(steps, 0) + 1)]
    if params.spec.nsfw_drop and status == "succeeded":
        lines.append(f"Total safe images: {params.kept} out of {params.num_outputs}")
    if status == "failed":
        lines.append(f"Traceback (most recent call last):\nRuntimeError: {pred.error}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- responses


def json_response(data: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def error_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: JSON | None = None,
) -> Response:
    """An RFC 7807-style error body ``{"title", "detail", "status", ...extra}``."""
    if status == 502:
        return Response(BAD_GATEWAY_HTML, status_code=502, media_type="text/html", headers=headers)
    body: JSON = {"title": title or ERROR_TITLES.get(status, "Error"), "detail": detail, "status": status}
    if extra:
        body.update(extra)
    return json_response(body, status, headers)


def throttled_response(retry_after: float) -> Response:
    seconds = max(0, math.ceil(retry_after))
    number: float = int(retry_after) if float(retry_after).is_integer() else retry_after
    return error_response(
        429,
        f"Request was throttled. Your rate limit resets in ~{seconds}s.",
        headers={"Retry-After": str(seconds)},
        extra={"retry_after": number},
    )


def fault_response(status: int, retry_after: float) -> Response:
    """The canned error for an injected status code."""
    if status == 429:
        return throttled_response(retry_after)
    details = {
        402: "You have insufficient credit to run this model. "
        "Go to https://replicate.com/account/billing#billing to purchase credit.",
        500: "An unexpected error occurred (injected by the fake server).",
        503: "The service is temporarily unavailable (injected by the fake server).",
        504: "The upstream server timed out (injected by the fake server).",
    }
    return error_response(status, details.get(status, f"Injected HTTP {status}."))


def not_found() -> Response:
    return json_response({"detail": "Not found.", "status": 404}, 404)


def invalid_input(errors: list[tuple[str, str, str]]) -> Response:
    """422 "Input validation failed" from (type, field, description) triples."""
    detail = "".join(f"- {field}: {desc}\n" if field else f"- {desc}\n" for _, field, desc in errors)
    fields_ = [{"type": t, "field": f, "description": d} for t, f, d in errors]
    return error_response(422, detail, title="Input validation failed", extra={"invalid_fields": fields_})


def invalid_version() -> Response:
    return error_response(
        422,
        "The specified version does not exist (or perhaps you don't have permission to use it?)",
        title="Invalid version or not permitted",
    )


# --------------------------------------------------------------------------- input validation


def validate_input(raw: object, model: str = "") -> tuple[Params | None, list[tuple[str, str, str]]]:
    """Validate a create body's ``input`` as ``model`` would; returns (params, []) or (None, errors)."""
    spec = spec_for(model)
    errors = validate(spec, raw)
    if errors or not isinstance(raw, dict):
        return None, errors
    prompt = str(raw["prompt"])
    seed = raw.get("seed")
    run = plan(spec, raw)
    flagged = parse_directives(prompt).nsfw
    return Params(
        prompt, run.width, run.height, run.count, seed if isinstance(seed, int) else None, spec, run.format, flagged
    ), []


def parse_prefer_wait(header: str | None) -> float | None:
    """Seconds to hold a create for ``Prefer: wait[=N]``, or None without it."""
    if not header:
        return None
    for token in header.split(","):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = float(value) if value.strip() else MAX_WAIT
        except ValueError:
            seconds = MAX_WAIT
        return min(max(seconds, 0.0), MAX_WAIT)
    return None


def model_version_id(model: str) -> str:
    """The model's version id: the real one for the models the fake knows, else a fixed fake hash."""
    spec = MODELS.get(model)
    return spec.version if spec is not None else hashlib.sha256(f"mediagen-fake:{model}".encode()).hexdigest()


def _is_missing(model: str) -> bool:
    return model.split("/", 1)[0] == "missing"


# --------------------------------------------------------------------------- the server


class FakeReplicate:
    """The server's state and request handlers (one instance per app)."""

    def __init__(self, config: FakeConfig, data_dir: Path | None = None) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.images = PngCache()
        self.predictions: dict[str, Prediction] = {}
        self.order: list[str] = []
        self.by_prompt: dict[str, int] = {}
        self.create_attempts: dict[str, int] = {}
        self.requests: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.versions: dict[str, str] = {}
        self.webhooks = WebhookSender(WEBHOOK_SECRET, lambda: self.config)
        self.store = PredictionStore(data_dir)
        self.unsent_webhooks: list[tuple[Prediction, str, Any, str]] = []
        """Webhooks of restored predictions, followed again once the server runs (`resume_webhooks`)."""
        for record in self.store.load():
            self.restore(record)

    # ------------------------------------------------------------------ the store

    @staticmethod
    def record(pred: Prediction) -> JSON:
        """What the store keeps of a prediction: what its status and files are derived from."""
        return {
            "id": pred.id,
            "model": pred.model,
            "version": pred.version,
            "input": pred.input,
            "output_mode": pred.output_mode,
            "created": pred.created_wall,
            "latency": pred.latency,
            "outcome": pred.outcome,
            "error": pred.error,
        }

    def follow_webhook(self, pred: Prediction, url: str, events: Any, base: str) -> None:
        self.webhooks.follow(pred, url, events, lambda: self.prediction_json(pred, base))

    def resume_webhooks(self) -> None:
        """After a restart, go on sending the webhooks of the predictions that were still running."""
        now = time.monotonic()
        for pred, url, events, base in self.unsent_webhooks:
            if pred.status(now) not in TERMINAL or pred.elapsed(now) < pred.latency + 60:
                self.follow_webhook(pred, url, events, base)
        self.unsent_webhooks.clear()

    def restore(self, record: JSON) -> None:
        """A prediction read back from the store (an unreadable one is skipped)."""
        params, _ = validate_input(record.get("input"), str(record.get("model", "")))
        if params is None or record.get("outcome") not in TERMINAL:
            return
        pred = Prediction(
            id=str(record["id"]),
            model=str(record["model"]),
            version=str(record["version"]),
            input=record["input"],
            params=params,
            directives=parse_directives(params.prompt),
            output_mode=str(record.get("output_mode", "url")),
            latency=float(record["latency"]),
            outcome=record["outcome"],
            error=record.get("error"),
            created_wall=float(record["created"]),
        )
        if record.get("canceled_after") is not None:
            pred.canceled_after = float(record["canceled_after"])
        self.predictions[pred.id] = pred
        self.order.append(pred.id)
        self.by_prompt[params.prompt] = self.by_prompt.get(params.prompt, 0) + 1
        self.versions.setdefault(pred.version, pred.model)
        if isinstance(record.get("webhook"), str):
            self.unsent_webhooks.append((pred, record["webhook"], record.get("events"), str(record.get("base", ""))))

    # ------------------------------------------------------------------ helpers

    def reset(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.predictions.clear()
        self.order.clear()
        self.by_prompt.clear()
        self.create_attempts.clear()
        self.requests.clear()
        self.faults.clear()
        self.images.clear()
        self.store.clear()

    def base_url(self, request: Request) -> str:
        if self.config.base_url:
            return self.config.base_url.rstrip("/")
        return str(request.base_url).rstrip("/")

    def check_auth(self, request: Request) -> Response | None:
        header = request.headers.get("authorization")
        if not header:
            return error_response(401, "You did not pass an authentication token")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        ok = scheme.lower() in ("bearer", "token") and bool(token)
        if ok and self.config.api_token is not None:
            ok = token == self.config.api_token
        return None if ok else error_response(401, "You did not pass a valid authentication token")

    def chance(self, probability: float) -> bool:
        return probability > 0 and self.rng.random() < probability

    def new_id(self) -> str:
        raw = self.rng.getrandbits(128).to_bytes(16, "big")
        return base64.b32encode(raw).decode().lower()[:26]

    def file_bytes(self, pred: Prediction, index: int) -> bytes:
        p = pred.params
        if p.format == "mp4":
            return TINY_MP4
        image = self.images.get(p.width, p.height, palette_index(p.prompt, p.seed, index), p.format)
        return mark(image, p.format, f"mediagen fake replicate {pred.id} {index} seed={p.seed}")

    def output(self, pred: Prediction, base: str) -> list[str] | str:
        """A list of URLs, or one URL for a model that makes one output (fake_replicate.models)."""
        p = pred.params
        media = {"mp4": "video/mp4", "jpg": "image/jpeg"}.get(p.format, f"image/{p.format}")
        if pred.output_mode == "data":
            urls = [
                f"data:{media};base64," + base64.b64encode(self.file_bytes(pred, i)).decode() for i in range(p.kept)
            ]
        else:
            urls = [f"{base}/files/{pred.id}/out-{i}.{p.format}" for i in range(p.kept)]
        return urls[0] if p.spec.output == "string" and urls else urls

    def prediction_json(self, pred: Prediction, base: str, *, hide_running: bool = False) -> JSON:
        """The Replicate prediction object; ``hide_running`` shows non-terminal as starting."""
        now = time.monotonic()
        status = pred.status(now)
        elapsed = pred.elapsed(now)
        if pred.canceled_after is not None:
            elapsed = pred.canceled_after
        if hide_running and status == "processing":
            status = "starting"
        terminal = status in TERMINAL
        end = pred.canceled_after if pred.canceled_after is not None else pred.latency
        started = status != "starting" and end >= pred.start_delay
        return {
            "id": pred.id,
            "model": pred.model,
            "version": pred.version,
            "input": pred.input,
            "output": self.output(pred, base) if status == "succeeded" else None,
            "logs": _logs(pred, status, elapsed),
            "error": pred.error if status == "failed" else None,
            "status": status,
            "source": "api",
            "data_removed": False,
            "created_at": _iso(pred.created_wall),
            "started_at": _iso(pred.created_wall + pred.start_delay) if started else None,
            "completed_at": _iso(pred.created_wall + end) if terminal else None,
            "metrics": self.metrics(pred, status, end) if terminal else {},
            "urls": {
                "get": f"{base}/v1/predictions/{pred.id}",
                "cancel": f"{base}/v1/predictions/{pred.id}/cancel",
            },
        }

    @staticmethod
    def metrics(pred: Prediction, status: Status, end: float) -> JSON:
        metrics: JSON = {"predict_time": round(max(end - pred.start_delay, 0.0), 6)}
        if status == "succeeded" and pred.params.format != "mp4":
            metrics["image_count"] = pred.params.kept
        return metrics

    def lookup(self, request: Request) -> Prediction | None:
        return self.predictions.get(str(request.path_params["prediction_id"]))

    def get_fault(self, pred: Prediction | None) -> Response | None:
        """An injected error for a GET (directive first, then probabilistic)."""
        status = pred.next_get_fault() if pred is not None else None
        if status is None and self.chance(self.config.p_get_503):
            status = 503
        if status is None and self.chance(self.config.p_get_429):
            status = 429
        if status is None:
            return None
        self.faults[f"get_{status}"] += 1
        return fault_response(status, self.config.retry_after)

    # ------------------------------------------------------------------ create

    async def create_for_model(self, request: Request) -> Response:
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        return await self.create(request, model)

    async def create_for_version(self, request: Request) -> Response:
        return await self.create(request, None)

    async def create(self, request: Request, model: str | None) -> Response:
        """Shared create path; ``model`` is None on the version route."""
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        self.requests["creates"] += 1
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return error_response(400, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return error_response(400, "The request body must be a JSON object.")
        # The request schemas have additionalProperties: false (unlike a model's input).
        allowed = BODY_KEYS if model is None else BODY_KEYS - {"version"}
        extra = sorted(key for key in body if key not in allowed)
        if extra:
            errors = [
                ("additional_property_not_allowed", "", f"Additional property {key} is not allowed") for key in extra
            ]
            return invalid_input(errors)
        if self.config.create_latency > 0:
            await asyncio.sleep(self.config.create_latency)
        resolved = self.resolve_model(model, body)
        if isinstance(resolved, Response):
            return resolved
        return await self.create_resolved(request, body, *resolved)

    def resolve_model(self, model: str | None, body: JSON) -> tuple[str, str] | Response:
        """(model, version) for a create, or an error response."""
        if model is not None:
            if _is_missing(model):
                return error_response(404, f"Model {model} not found.")
            version = model_version_id(model)
            self.versions.setdefault(version, model)
            return model, version
        ref = body.get("version")
        if not isinstance(ref, str) or not ref.strip():
            return invalid_version()
        if ":" in ref:
            named, _, version_id = ref.partition(":")
            if _is_missing(named):
                return error_response(404, f"Model {named} not found.")
            return named, version_id
        return self.versions.get(ref, "fake/model"), ref

    def global_create_fault(self) -> Response | None:
        if self.chance(self.config.p_create_429):
            self.faults["create_429"] += 1
            return throttled_response(self.config.retry_after)
        if self.chance(self.config.p_create_500):
            self.faults["create_500"] += 1
            return fault_response(500, self.config.retry_after)
        return None

    def directive_create_fault(self, prompt: str, directives: Directives) -> Response | None:
        if not directives.counts_creates:
            return None
        attempt = self.create_attempts.get(prompt, 0)
        self.create_attempts[prompt] = attempt + 1
        fault = create_fault_for(directives.create_faults, attempt)
        if fault is None:
            return None
        self.faults[f"create_{fault.status}"] += 1
        after = fault.retry_after if fault.retry_after is not None else self.config.retry_after
        return fault_response(fault.status, after)

    async def create_resolved(self, request: Request, body: JSON, model: str, version: str) -> Response:
        fault = self.global_create_fault()
        if fault is not None:
            return fault
        raw_input = body.get("input")
        params, errors = validate_input(raw_input, model)
        if params is None or not isinstance(raw_input, dict):
            return invalid_input(errors)
        directives = parse_directives(params.prompt)
        if directives.invalid:
            return invalid_input([("invalid", "input.prompt", "Prompt rejected by [[invalid]] directive")])
        fault = self.directive_create_fault(params.prompt, directives)
        if fault is not None:
            return fault
        index = self.by_prompt.get(params.prompt, 0)
        pred = self.new_prediction(model, version, raw_input, params, directives, index)
        if isinstance(body.get("webhook"), str):
            base = self.base_url(request)
            self.follow_webhook(pred, body["webhook"], body.get("webhook_events_filter"), base)
            self.store.update(pred.id, webhook=body["webhook"], events=body.get("webhook_events_filter"), base=base)
        if directives.hang_create > 0 and first_n_applies(directives.hang_count, index):
            await asyncio.sleep(directives.hang_create)
        return await self.create_reply(request, pred)

    def outcome(self, directives: Directives, index: int, params: Params) -> tuple[Status, str | None]:
        if directives.flagged:
            return "failed", FLAGGED_ERROR
        if params.flagged and not params.spec.nsfw_drop:
            return "failed", FLAGGED_ERROR  # the API proxies refuse a flagged image outright
        if params.flagged and params.kept == 0:
            return "failed", NSFW_ERROR
        if directives.fail and first_n_applies(directives.fail_count, index):
            return "failed", CRASH_ERROR
        if self.chance(self.config.p_flagged):
            return "failed", FLAGGED_ERROR
        if self.chance(self.config.p_model_error):
            return "failed", OOM_ERROR
        return "succeeded", None

    def latency_for(self, directives: Directives) -> float:
        if directives.latency is not None:
            return directives.latency
        latency, jitter = self.config.latency, self.config.latency_jitter
        if jitter > 0 and latency > 0:
            latency *= 1.0 + self.rng.uniform(-jitter, jitter)
        return max(latency, 0.0)

    def new_prediction(
        self, model: str, version: str, raw_input: JSON, params: Params, directives: Directives, index: int
    ) -> Prediction:
        outcome, error = self.outcome(directives, index, params)
        mode = directives.output if directives.output in ("data", "url") else self.config.output_mode
        pred = Prediction(
            id=self.new_id(),
            model=model,
            version=version,
            input=raw_input,
            params=params,
            directives=directives,
            output_mode=mode,
            latency=self.latency_for(directives),
            outcome=outcome,
            error=error,
        )
        self.predictions[pred.id] = pred
        self.order.append(pred.id)
        self.by_prompt[params.prompt] = index + 1
        self.store.created(self.record(pred))
        return pred

    async def create_reply(self, request: Request, pred: Prediction) -> Response:
        base = self.base_url(request)
        headers = {"Location": f"{base}/v1/predictions/{pred.id}"}
        wait = parse_prefer_wait(request.headers.get("prefer"))
        if wait is not None:
            await pred.wait(wait)
            headers["Preference-Applied"] = "wait"
        body = self.prediction_json(pred, base, hide_running=wait is not None)
        return json_response(body, 201, headers)

    # ------------------------------------------------------------------ read / cancel

    async def get_prediction(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        self.requests["gets"] += 1
        pred = self.lookup(request)
        if pred is None:
            return not_found()
        fault = self.get_fault(pred)
        if fault is not None:
            return fault
        return json_response(self.prediction_json(pred, self.base_url(request)))

    async def cancel_prediction(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        self.requests["cancels"] += 1
        pred = self.lookup(request)
        if pred is None:
            return not_found()
        if pred.cancel(time.monotonic()) and pred.canceled_after is not None:
            self.store.update(pred.id, canceled_after=pred.canceled_after)
        return json_response(self.prediction_json(pred, self.base_url(request)))

    async def list_predictions(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        self.requests["lists"] += 1
        fault = self.get_fault(None)
        if fault is not None:
            return fault
        end = len(self.order)
        cursor = request.query_params.get("cursor")
        if cursor:
            if not cursor.isdigit():
                return error_response(400, "Invalid cursor.")
            end = min(int(cursor), end)
        start = max(0, end - PAGE_SIZE)
        base = self.base_url(request)
        results = [self.prediction_json(self.predictions[i], base) for i in reversed(self.order[start:end])]
        next_url = f"{base}/v1/predictions?cursor={start}" if start > 0 else None
        return json_response({"next": next_url, "previous": None, "results": results})

    # ------------------------------------------------------------------ models, versions, webhooks

    def version_json(self, version_id: str, model: str = "") -> JSON:
        """The version object, with the model's own Cog schema (fake_replicate.models)."""
        return {
            "id": version_id,
            "created_at": "2024-08-01T00:00:00.000000Z",
            "cog_version": "0.9.0",
            "openapi_schema": openapi_schema(spec_for(model)),
        }

    async def get_version(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        if _is_missing(model):
            return not_found()
        version_id = str(request.path_params["version_id"])
        self.versions.setdefault(version_id, model)
        return json_response(self.version_json(version_id, model))

    async def get_model(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        owner, name = str(request.path_params["owner"]), str(request.path_params["name"])
        model = f"{owner}/{name}"
        if _is_missing(model):
            return not_found()
        version = model_version_id(model)
        self.versions.setdefault(version, model)
        return json_response(
            {
                "url": f"https://replicate.com/{model}",
                "owner": owner,
                "name": name,
                "description": "A fake text-to-image model served by mediagen's fake Replicate.",
                "visibility": "public",
                "github_url": None,
                "paper_url": None,
                "license_url": None,
                "run_count": self.requests["creates"],
                "cover_image_url": None,
                "default_example": None,
                "latest_version": self.version_json(version, model),
            }
        )

    async def webhook_secret(self, request: Request) -> Response:
        denied = self.check_auth(request)
        return denied if denied is not None else json_response({"key": WEBHOOK_SECRET})

    # ------------------------------------------------------------------ files

    async def get_file(self, request: Request) -> Response:
        self.requests["files"] += 1
        pred = self.lookup(request)
        index = int(request.path_params["index"])
        if pred is None or pred.status(time.monotonic()) != "succeeded":
            return not_found()
        if not 0 <= index < pred.params.kept or pred.directives.output == "404":
            return not_found()
        if pred.directives.output == "notimage":
            return Response(b"<html>", media_type="text/html")
        fmt = pred.params.format
        if request.path_params.get("ext", fmt) != fmt:
            return not_found()
        media = {"mp4": "video/mp4", "jpg": "image/jpeg"}.get(fmt, f"image/{fmt}")
        return Response(self.file_bytes(pred, index), media_type=media)

    # ------------------------------------------------------------------ control

    async def get_config(self, request: Request) -> Response:
        return json_response(asdict(self.config))

    async def put_config(self, request: Request) -> Response:
        try:
            patch = orjson.loads(await request.body())
            if not isinstance(patch, dict):
                raise ValueError("the body must be a JSON object")
            new = config_with(self.config, patch)
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            return error_response(400, str(exc))
        if new.seed != self.config.seed:
            self.rng = random.Random(new.seed)
        self.config = new
        return json_response(asdict(new))

    async def post_reset(self, request: Request) -> Response:
        self.reset()
        return json_response({"ok": True})

    def status_counts(self) -> dict[str, int]:
        now = time.monotonic()
        return dict(Counter(pred.status(now) for pred in self.predictions.values()))

    def images_made(self) -> int:
        """Images of succeeded predictions: what Replicate would bill for."""
        now = time.monotonic()
        done = (p for p in self.predictions.values() if p.status(now) == "succeeded" and p.params.format != "mp4")
        return sum(p.params.kept for p in done)

    async def get_stats(self, request: Request) -> Response:
        return json_response(
            {
                "creates": self.requests["creates"],
                "predictions": len(self.predictions),
                "by_prompt": self.by_prompt,
                "statuses": self.status_counts(),
                "requests": dict(self.requests),
                "faults": dict(self.faults),
                "image_renders": self.images.renders,
                "images": self.images_made(),
                "webhooks": dict(self.webhooks.stats),
            }
        )

    async def health(self, request: Request) -> Response:
        return json_response({"ok": True})

    # ------------------------------------------------------------------ routing

    def routes(self) -> list[Route]:
        pid = "/v1/predictions/{prediction_id}"
        return [
            Route("/v1/models/{owner}/{name}/predictions", self.create_for_model, methods=["POST"]),
            Route("/v1/deployments/{owner}/{name}/predictions", self.create_for_model, methods=["POST"]),
            Route("/v1/predictions", self.create_for_version, methods=["POST"]),
            Route("/v1/predictions", self.list_predictions, methods=["GET"]),
            Route(pid, self.get_prediction, methods=["GET"]),
            Route(pid + "/cancel", self.cancel_prediction, methods=["POST"]),
            Route("/v1/models/{owner}/{name}", self.get_model, methods=["GET"]),
            Route("/v1/models/{owner}/{name}/versions/{version_id}", self.get_version, methods=["GET"]),
            Route("/v1/webhooks/default/secret", self.webhook_secret, methods=["GET"]),
            Route("/files/{prediction_id}/out-{index:int}.{ext}", self.get_file, methods=["GET"]),
            Route("/files/{prediction_id}/{index:int}.png", self.get_file, methods=["GET"]),
            Route("/_fake/config", self.get_config, methods=["GET"]),
            Route("/_fake/config", self.put_config, methods=["PUT"]),
            Route("/_fake/reset", self.post_reset, methods=["POST"]),
            Route("/_fake/stats", self.get_stats, methods=["GET"]),
            Route("/_fake/health", self.health, methods=["GET"]),
        ]


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return not_found()
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal server error."
    return error_response(status, str(detail), headers=getattr(exc, "headers", None))


def create_app(config: FakeConfig | None = None, *, data_dir: Path | None = None) -> Starlette:
    """Build the fake Replicate app; its state is ``app.state.fake`` (a FakeReplicate).

    ``data_dir``: keep predictions there across restarts (see :mod:`fake_replicate.store`).
    """
    fake = FakeReplicate(config or FakeConfig(), data_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fake.resume_webhooks()
        try:
            yield
        finally:
            await fake.webhooks.aclose()
            fake.store.close()

    app = Starlette(routes=fake.routes(), exception_handlers={HTTPException: _http_exception}, lifespan=lifespan)
    app.add_middleware(RateLimits, fake=fake)
    app.state.fake = fake
    return app
