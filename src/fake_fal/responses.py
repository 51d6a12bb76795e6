"""The fake's answers: fal's JSON errors, an ingress's HTML ones, and a connection dropped mid-answer.

Two kinds of error matter to `fal-client`, which retries by them (``_should_retry`` in its client.py):
an answer from fal's own servers carries ``x-fal-request-id`` and a JSON ``detail``; an ingress error
(502/503/504 with "nginx" in an HTML body and no ``x-fal-request-id``) is retried by the client, as are
429, 408, 409 and a dropped connection, on every call, submits included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

INGRESS_TITLES: Final[Mapping[int, str]] = {
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}
RUNNER_ERRORS: Final[Mapping[int, tuple[str, str | None]]] = {
    500: ("Internal server error (injected by the fake fal).", "internal_server_error"),
    503: ("No runner could be allocated to handle the request.", "runner_scheduling_failure"),
    504: ("Request timed out", "request_timeout"),
}


def json_response(data: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def detail_response(
    status: int, detail: object, *, request_id: str | None = None, error_type: str | None = None, **extra: Any
) -> Response:
    """fal's error answer: ``{"detail": ...}``, from fal's servers when ``request_id`` is given."""
    headers: dict[str, str] = {}
    if request_id is not None:
        headers["x-fal-request-id"] = request_id
    body: dict[str, Any] = {"detail": detail, **extra}
    if error_type is not None:
        body["error_type"] = error_type
        headers["x-fal-error-type"] = error_type
    return json_response(body, status, headers)


def ingress_response(status: int) -> Response:
    """What fal's nginx answers when it cannot reach the queue (no ``x-fal-request-id``)."""
    title = f"{status} {INGRESS_TITLES.get(status, 'Error')}"
    page = f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
    page += "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    return Response(page.encode(), status_code=status, media_type="text/html")


def fault_response(status: int, retry_after: float, request_id: str | None = None) -> Response:
    """The canned answer for an injected status: 429 with Retry-After, 502/504 from the ingress, else fal's JSON."""
    if status == 429:
        seconds = max(0, math.ceil(retry_after))
        response = detail_response(429, f"Rate limit exceeded. Retry in {seconds}s (injected by the fake fal).")
        response.headers["Retry-After"] = str(seconds)
        return response
    if status in (502, 504) and request_id is None:
        return ingress_response(status)
    detail, error_type = RUNNER_ERRORS.get(status, (f"Injected HTTP {status}.", None))
    return detail_response(status, detail, request_id=request_id, error_type=error_type)


class DroppedConnection(Response):
    """Starts an answer and never finishes it: the server closes the connection mid-body."""

    def __init__(self) -> None:
        super().__init__(b"", status_code=200, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"status": "IN_QUEUE", ', "more_body": True})
        # Returning now leaves the answer incomplete: uvicorn closes the connection.


def unauthorized(detail: str) -> Response:
    return detail_response(401, detail)


def not_found(request_id: str | None = None) -> Response:
    return detail_response(404, "Request not found", request_id=request_id)
