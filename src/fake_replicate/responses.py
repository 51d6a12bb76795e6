"""What the fake answers, in Replicate's shapes: the prediction object, its output files, and the error bodies.

The prediction object follows shared/replicate-api.md §1.4 (``logs`` with tqdm lines where the real model
writes them, ``metrics`` on terminal states); errors are RFC 7807-style JSON (§1.5), except a 502, which
has the HTML body a gateway sends. And no answer at all: ``drop_connection``.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from starlette.responses import Response
from starlette.types import Scope

from fake_replicate.images import PngCache, mark, palette_index
from fake_replicate.prediction import TERMINAL, Prediction, Status
from fake_replicate.video import TINY_MP4

JSON = dict[str, Any]

RAW_SEND: Final = "fake_replicate.raw_send"
"""The scope key of the server's own ``send`` (set by ``server.FakeApp``), for ``drop_connection``."""
PROGRESS_STEPS: Final = 4
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


# --------------------------------------------------------------------------- errors


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


class ConnectionDropped(Exception):
    """A connection the fake drops where it cannot close it itself (an in-process ASGI transport)."""


async def drop_connection(scope: Scope) -> None:
    """Close the client's connection without a word, as a gateway that gives up does.

    Under uvicorn the server's own ``send`` is a method of its request cycle, which holds the
    connection's transport: closing it sends nothing, and uvicorn sends nothing more once it has seen
    the connection go (a handler's later answer is dropped). Anywhere else (httpx's ASGITransport in
    tests) this raises ``ConnectionDropped``, which the client sees as its request failing.
    """
    cycle = getattr(scope.get(RAW_SEND), "__self__", None)
    close = getattr(getattr(cycle, "transport", None), "close", None)  # asyncio's or uvloop's transport
    if not callable(close):
        raise ConnectionDropped("the fake dropped the connection")
    close()
    for _ in range(200):  # connection_lost runs on a later turn of the loop
        if getattr(cycle, "disconnected", True):
            return
        await asyncio.sleep(0.001)


# --------------------------------------------------------------------------- the prediction object


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _progress_line(step: int) -> str:
    pct = step * 100 // PROGRESS_STEPS
    bar = ("\u2588" * (step * 10 // PROGRESS_STEPS)).ljust(10)
    return f"{pct:3d}%|{bar}| {step}/{PROGRESS_STEPS} [00:00<00:00, 4.00it/s]"


def _logs(pred: Prediction, status: Status, elapsed: float) -> str:
    """Like the real model's: tqdm bars where it writes them (the flux fp8 path), NSFW counts where it drops."""
    if status in ("starting", "aborted"):
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


def file_bytes(pred: Prediction, index: int, images: PngCache) -> bytes:
    """The bytes of output file ``index``: the tiny MP4, or an image marked with the prediction and index."""
    p = pred.params
    if p.format == "mp4":
        return TINY_MP4
    image = images.get(p.width, p.height, palette_index(p.prompt, p.seed, index), p.format)
    return mark(image, p.format, f"mediagen fake replicate {pred.id} {index} seed={p.seed}")


def media_type(fmt: str) -> str:
    return {"mp4": "video/mp4", "jpg": "image/jpeg"}.get(fmt, f"image/{fmt}")


def output(pred: Prediction, base: str, images: PngCache) -> list[str] | str:
    """A list of URLs, or one URL for a model that makes one output (fake_replicate.models)."""
    p = pred.params
    if pred.output_mode == "data":
        media = media_type(p.format)
        urls = [f"data:{media};base64," + base64.b64encode(file_bytes(pred, i, images)).decode() for i in range(p.kept)]
    else:
        urls = [f"{base}/files/{pred.id}/out-{i}.{p.format}" for i in range(p.kept)]
    return urls[0] if p.spec.output == "string" and urls else urls


def metrics(pred: Prediction, status: Status, end: float) -> JSON:
    found: JSON = {"predict_time": round(max(end - pred.start_delay, 0.0), 6)}
    if status == "succeeded" and pred.params.format != "mp4":
        found["image_count"] = pred.params.kept
    return found


def prediction_object(pred: Prediction, base: str, images: PngCache, now: float, *, hide_running: bool = False) -> JSON:
    """The Replicate prediction object at monotonic time ``now``; ``hide_running`` shows non-terminal as starting."""
    status = pred.status(now)
    end, _ = pred.ending()
    elapsed = min(pred.elapsed(now), end)
    if hide_running and status == "processing":
        status = "starting"
    terminal = status in TERMINAL
    started = status != "starting" and end >= pred.start_delay
    return {
        "id": pred.id,
        "model": pred.model,
        "version": pred.version,
        "input": pred.input,
        "output": output(pred, base, images) if status == "succeeded" else None,
        "logs": _logs(pred, status, elapsed),
        "error": pred.error if status == "failed" else None,
        "status": status,
        "source": "api",
        "data_removed": False,
        "created_at": _iso(pred.created_wall),
        "started_at": _iso(pred.created_wall + pred.start_delay) if started else None,
        "completed_at": _iso(pred.created_wall + end) if terminal else None,
        "metrics": metrics(pred, status, end) if terminal else {},
        "urls": {
            "get": f"{base}/v1/predictions/{pred.id}",
            "cancel": f"{base}/v1/predictions/{pred.id}/cancel",
        },
    }
