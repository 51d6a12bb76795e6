"""`GET /media/{job}/{n}.{ext}`: an output's bytes, from either store, with byte ranges.

Local files go out via sendfile (Starlette's FileResponse answers Range itself); S3 objects are
streamed in chunks, one `bytes=first-[last]` range at most, or answered with a redirect to a
presigned URL when `MEDIAGEN_MEDIA_REDIRECT` is on. Outputs never change, so they are cacheable
for a year: by anyone without API keys, by the caller's own cache only with them (`private`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from mediagen.api.auth import visible_to
from mediagen.api.http import error
from mediagen.api.limits import LimitedOwner
from mediagen.api.schemas import ERRORS, ErrorResponse
from mediagen.api.state import Api
from mediagen.core import jobs
from mediagen.core.errors import StorageError
from mediagen.logging import log_event
from mediagen.storage import CONTENT_TYPES, ByteRange, ObjectStream, is_valid_key
from mediagen.storage.local import LocalStorage

router = APIRouter()

_BYTES: dict[str, Any] = {
    media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in sorted(set(CONTENT_TYPES.values()))
}


@router.get(
    "/media/{key:path}",
    response_class=Response,
    responses={
        **ERRORS,
        200: {"content": _BYTES, "description": "The output's bytes"},
        206: {"content": _BYTES, "description": "The byte range asked for with a Range header"},
        307: {"description": "With MEDIAGEN_MEDIA_REDIRECT on S3: a presigned URL of the output"},
        404: {"model": ErrorResponse, "description": "No such output, or not yours"},
        416: {"description": "The range starts past the end; Content-Range names the size"},
    },
    summary="An output's bytes (image or video); a Range header gets that part",
)
async def media(
    key: str,
    state: Api,
    owner: LimitedOwner,
    range_header: Annotated[str | None, Header(alias="range", include_in_schema=False)] = None,
) -> Response:
    if not is_valid_key(key):
        return error(404, "not_found", "no such image")
    job_id = uuid.UUID(key.split("/", 1)[0])
    if visible_to(owner) is not None and await jobs.get_status(state.db, job_id, owner) is None:
        return error(404, "not_found", "no such image")
    # Behind API keys an output is its owner's alone: no shared cache may keep it for others.
    cache = _PRIVATE if state.keyring.enabled else _PUBLIC
    storage = state.storage
    if isinstance(storage, LocalStorage):  # sendfile, straight from the disk
        path = storage.path(key)
        if not await asyncio.to_thread(path.is_file):
            return error(404, "not_found", "no such image")
        # Starlette's FileResponse answers Range requests itself (206, 416, multipart).
        return FileResponse(path, media_type=CONTENT_TYPES[key.rsplit(".", 1)[1]], headers=cache)
    settings = state.settings
    try:
        if settings.media_redirect:
            url = await storage.presigned_url(key, settings.media_presign_seconds)
            # A missing object gets a URL too: checking first keeps the 404 ours, not the store's XML.
            if url is not None and await storage.exists(key):
                return RedirectResponse(url, status_code=307)
        byte_range = _byte_range(range_header)
        stream = await storage.open(key, byte_range)
    except StorageError as exc:
        log_event("media.storage_failed", logging.WARNING, key=key, error=exc.error_class, detail=exc.message)
        return error(
            503, "service_unavailable", "the image store is not reachable; try again shortly", {"Retry-After": "5"}
        )
    if stream is None:
        return error(404, "not_found", "no such image")
    headers = {**cache, "Accept-Ranges": "bytes", "Content-Length": str(stream.size)}
    if byte_range is None:
        return StreamingResponse(_until_closed(stream), media_type=stream.content_type, headers=headers)
    if stream.first >= stream.total:
        await stream.aclose()
        return Response(status_code=416, headers={"Content-Range": f"bytes */{stream.total}"})
    headers["Content-Range"] = f"bytes {stream.first}-{stream.first + stream.size - 1}/{stream.total}"
    return StreamingResponse(_until_closed(stream), status_code=206, media_type=stream.content_type, headers=headers)


_PUBLIC = {"Cache-Control": "public, max-age=31536000, immutable"}
_PRIVATE = {"Cache-Control": "private, max-age=31536000, immutable"}
_RANGE = re.compile(r"bytes=(\d{1,15})-(\d{1,15})?")


def _byte_range(header: str | None) -> ByteRange | None:
    """One `bytes=first-[last]` range; anything else (several ranges, a suffix) gets the whole object,
    as RFC 9110 allows a server to do."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None:
        return None
    first, last = int(match[1]), int(match[2]) if match[2] else None
    return None if last is not None and last < first else (first, last)


async def _until_closed(stream: ObjectStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        await stream.aclose()  # a client that went away must not hold the store's connection
