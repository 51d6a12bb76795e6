"""Fetching a prediction's outputs at once (Replicate deletes them after an hour) and storing them.

A model answers one URL or a list (shorter than `num_outputs` when it dropped NSFW-flagged images:
recorded as it is, not an error); each file is an image (PNG, JPEG, WebP, GIF) or a video (MP4, WebM),
stored under the extension and content type its bytes show, with its pixel size read from the header.

The bytes come through mediagen.providers.downloads (trusted hosts only, no redirects, bounded in
size); here they must be media (sniffed, not just the header believed). Each file is read into memory
once, hashed, and written atomically.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterable
from typing import Any

from PIL import Image

from mediagen import metrics
from mediagen.core.errors import OutputRejected
from mediagen.core.jobs import StoredOutput
from mediagen.providers.downloads import Downloader
from mediagen.storage import CONTENT_TYPES, Storage

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)


def sniff_media(data: bytes) -> str | None:
    """The media kind (`png`, `jpg`, `webp`, `gif`, `mp4`, `webm`) of these bytes, or None."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp":  # ISO base media: the first box is the file type box
        return "mp4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):  # EBML, the container of WebM
        return "webm"
    return None


def pixel_size(data: bytes, kind: str) -> tuple[int | None, int | None]:
    """An image's width and height from its header (Pillow reads no pixels for this); None for video."""
    if kind in ("mp4", "webm"):
        return None, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, None
    return width, height


def output_urls(output: Any) -> list[str]:
    """The prediction's output as a list of URLs (a list, a single URL, or FileOutput objects)."""
    if output is None:
        return []
    items: Iterable[Any] = output if isinstance(output, list) else [output]
    urls = []
    for item in items:
        url = getattr(item, "url", item)
        if not isinstance(url, str):
            raise OutputRejected(f"the prediction's output is not a URL: {type(item).__name__}")
        urls.append(url)
    return urls


async def store_outputs(downloader: Downloader, storage: Storage, job_id: uuid.UUID, output: Any) -> list[StoredOutput]:
    urls = output_urls(output)
    if not urls:
        raise OutputRejected("the prediction succeeded without any output")
    stored = []
    for index, url in enumerate(urls):
        with metrics.timed(metrics.download_latency):
            data = await downloader.fetch(url)
        kind = sniff_media(data)
        if kind is None:
            raise OutputRejected(f"output {index} is not an image or a video")
        key = f"{job_id}/{index}.{kind}"
        width, height = pixel_size(data, kind)
        digest = hashlib.sha256(data).hexdigest()
        with metrics.timed(metrics.store_latency):
            obj = await storage.save(key, data, CONTENT_TYPES[kind], digest)
        stored.append(StoredOutput(index, key, obj.content_type, obj.size, digest, width, height))
    return stored
