"""HTTP plumbing shared by the routes: JSON answers, JSON request bodies, the body-size limit, error
answers.

A route with a body (`JSONBodyRoute`) takes `application/json` only (anything else is a 415) and
parses it once, strictly: malformed JSON and an object with a key twice are a 400 that says where,
before any field is validated (a field's problem is a 422).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mediagen.api.auth import Unauthorized
from mediagen.api.limits import RateLimited
from mediagen.core.db import UNREACHABLE
from mediagen.core.errors import (
    DependencyUnavailable,
    InvalidParameters,
    JobConflict,
    JobNotFound,
    ModelSchemaUnknown,
)
from mediagen.logging import log_event

RETRY_AFTER_SECONDS = "5"


class FastJSON(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=str)


class ModelResponse(Response):
    """A declared response model as JSON, for a route that chooses its status code and headers itself
    (FastAPI serializes a returned model only with the route's one status code)."""

    media_type = "application/json"

    def __init__(self, model: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None) -> None:
        super().__init__(model.model_dump_json(), status_code, headers)


def error(status: int, code: str, detail: Any = None, headers: dict[str, str] | None = None) -> FastJSON:
    return FastJSON({"error": code, "detail": detail}, status_code=status, headers=headers)


def invalid_field(field: str, message: str, *, summary: str | None = None, kind: str | None = None) -> FastJSON:
    """The 422 of one bad field, shaped as every other validation error: `summary` defaults to
    `field: message`; `kind` is the field's `type`, when there is one to name."""
    problem = {"field": field, "message": message} | ({"type": kind} if kind is not None else {})
    return error(422, "validation_failed", {"message": summary or f"{field}: {message}", "fields": [problem]})


class InvalidField(Exception):
    """One bad field a route finds beyond what the schema checks (a model not allowed, a cursor not
    ours): a 422 shaped as every other (see `invalid_field`)."""

    def __init__(self, field: str, message: str, *, summary: str | None = None, kind: str | None = None) -> None:
        super().__init__(summary or f"{field}: {message}")
        self.field, self.message, self.summary, self.kind = field, message, summary, kind


class MalformedJSON(HTTPException):
    """A request body that is not one well-formed JSON document with unique keys (a 400)."""

    def __init__(self, detail: str) -> None:
        super().__init__(400, detail)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # the rare case: find the culprit
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise MalformedJSON(f"the key {key!r} appears twice in one JSON object")
            seen.add(key)
    return obj


_decode = json.JSONDecoder(object_pairs_hook=_unique_keys).decode


def parse_json(body: bytes) -> Any:
    """One JSON document, or MalformedJSON naming where it breaks or the key given twice."""
    try:
        return _decode(body.decode())
    except UnicodeDecodeError as exc:
        raise MalformedJSON(f"the body is not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise MalformedJSON(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise MalformedJSON("the JSON is nested too deeply") from None


def _is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


class _JSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JSONBodyRoute(APIRoute):
    """A route whose body is JSON: 415 for another media type, 400 for malformed JSON (see `parse_json`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def json_body(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if content_type is None or not _is_json(content_type):
                return error(
                    415, "unsupported_media_type", "the body must be JSON, sent as Content-Type: application/json"
                )
            return await handler(_JSONRequest(request.scope, request.receive))

        return json_body


class BodySizeLimit:
    """Answers 413 to a body over `max_bytes`, declared or streamed, as soon as a route reads it.

    The request is routed first (a declared length too large fails the first read, before a byte is
    read), so the 413 is counted under its route in the request metrics. A path of `per_path` has its
    own limit (a provider's webhook carries more than a client's request).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        max_bytes = self.per_path.get(scope["path"], self.max_bytes)
        declared_too_large = any(
            name == b"content-length" and value.isdigit() and int(value) > max_bytes for name, value in scope["headers"]
        )
        seen = 0
        exceeded = False

        async def limited() -> Message:
            nonlocal seen, exceeded
            if declared_too_large:  # fail before reading anything
                exceeded = True
                raise _TooLarge
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    exceeded = True
                    raise _TooLarge
            return message

        async def unless_exceeded(message: Message) -> None:
            # Frameworks turn an error while reading the body into their own 400: drop that answer.
            if not exceeded:
                await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited, unless_exceeded)
        if exceeded:
            response = error(413, "request_too_large", f"the body must be at most {max_bytes} bytes")
            await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {
            "field": _field(tuple(item.get("loc", ()))),
            "message": item.get("msg", "invalid"),
            "type": item.get("type"),
        }
        for item in exc.errors()
    ]
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return error(422, "validation_failed", {"message": summary, "fields": problems})


async def _invalid_parameters(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidParameters)
    return error(422, "validation_failed", {"message": exc.message, "fields": exc.fields})


async def _invalid_field(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidField)
    return invalid_field(exc.field, exc.message, summary=exc.summary, kind=exc.kind)


async def _schema_unknown(request: Request, exc: Exception) -> Response:
    return error(503, "service_unavailable", str(exc), headers={"Retry-After": RETRY_AFTER_SECONDS})


async def _unavailable(request: Request, exc: Exception) -> Response:
    log_event("api.dependency_unavailable", logging.WARNING, path=request.url.path, error=type(exc).__name__)
    return error(
        503,
        "service_unavailable",
        "the database is not reachable; try again shortly",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, "not_found", str(exc))


async def _conflict(request: Request, exc: Exception) -> Response:
    return error(409, "conflict", str(exc))


async def _unauthorized(request: Request, exc: Exception) -> Response:
    return error(401, "unauthorized", str(exc), headers={"WWW-Authenticate": "Bearer"})


async def _rate_limited(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RateLimited)
    return error(429, "rate_limited", {"limit": exc.limit, "message": exc.message}, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
    if isinstance(exc, MalformedJSON):
        return error(400, "malformed_json", exc.detail)
    headers = dict(exc.headers) if exc.headers else None
    return error(exc.status_code, codes.get(exc.status_code, "http_error"), exc.detail, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log_event("api.unexpected_error", logging.ERROR, path=request.url.path, exc_info=exc)
    return error(500, "internal_error", "an unexpected error; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(JobNotFound, _not_found)
    app.add_exception_handler(JobConflict, _conflict)
    app.add_exception_handler(InvalidParameters, _invalid_parameters)
    app.add_exception_handler(InvalidField, _invalid_field)
    app.add_exception_handler(ModelSchemaUnknown, _schema_unknown)
    app.add_exception_handler(Unauthorized, _unauthorized)
    app.add_exception_handler(RateLimited, _rate_limited)
    unavailable: tuple[type[Exception], ...] = (DependencyUnavailable, *UNREACHABLE)
    for kind in unavailable:
        app.add_exception_handler(kind, _unavailable)
    app.add_exception_handler(Exception, _unexpected)
