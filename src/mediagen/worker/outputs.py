"""Fetching a prediction's outputs at once (Replicate deletes them after an hour) and storing them.

A model answers one URL or a list (shorter than `num_outputs` when it dropped NSFW-flagged images:
recorded as it is, not an error); each file is an image (PNG, JPEG, WebP, GIF) or a video (MP4, WebM),
stored under the extension and content type its bytes show, with its pixel size read from the header.

Only from hosts we trust (`replicate.delivery` and its subdomains, the provider's own host, and the
`MEDIAGEN_DOWNLOAD_ALLOWED_HOSTS`), no redirects, at most `max_output_bytes`, and only media (the
bytes are sniffed, not just the header believed). Each image is read into memory once, hashed as it
arrives, and written atomically.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import uuid
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from mediagen import metrics
from mediagen.core.errors import OutputDownloadFailed, OutputRejected
from mediagen.core.jobs import StoredOutput
from mediagen.providers.transport import LeanTransport, proxies_configured
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


class Downloader:
    def __init__(
        self,
        *,
        allowed_hosts: Sequence[str],
        max_bytes: int,
        timeout_seconds: float = 30.0,
        auth_token: str | None = None,
        max_connections: int = 200,
    ) -> None:
        self.allowed_hosts = [host.lower() for host in allowed_hosts]
        self.max_bytes = max_bytes
        self._auth_token = auth_token
        timeout = httpx.Timeout(timeout_seconds, connect=5.0)
        if proxies_configured():
            # httpx's own transport honours HTTP(S)_PROXY and NO_PROXY (a given transport would not).
            limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            self.client = httpx.AsyncClient(follow_redirects=False, timeout=timeout, limits=limits)
        else:
            self.client = httpx.AsyncClient(
                follow_redirects=False, timeout=timeout, transport=LeanTransport(max_connections=max_connections)
            )

    def host_allowed(self, host: str) -> bool:
        host = host.lower()
        return any(host == allowed or host.endswith("." + allowed) for allowed in self.allowed_hosts)

    async def fetch(self, url: str) -> bytes:
        if url.startswith("data:"):
            return self._decode_data_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OutputRejected(f"output URL scheme not allowed: {parts.scheme or url[:20]!r}")
        if not self.host_allowed(parts.hostname):
            raise OutputRejected(f"output host not allowed: {parts.hostname}")
        headers = {}
        if self._auth_token and parts.hostname.endswith("replicate.delivery"):
            headers["Authorization"] = f"Bearer {self._auth_token}"
        try:
            async with self.client.stream("GET", url, headers=headers) as response:
                return await self._read(response)
        except httpx.TransportError as error:
            raise OutputDownloadFailed(f"output download failed: {type(error).__name__}") from error

    async def _read(self, response: httpx.Response) -> bytes:
        if response.is_redirect:
            raise OutputRejected(f"output download redirected (HTTP {response.status_code})")
        if response.status_code >= 400:
            raise OutputDownloadFailed(
                f"output download failed: HTTP {response.status_code}",
                http_status=response.status_code,
            )
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise OutputRejected(f"output too large: {declared} bytes > {self.max_bytes}")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_bytes:
                raise OutputRejected(f"output too large: over {self.max_bytes} bytes")
        return b"".join(chunks)  # one chunk (most images) is not copied at all

    def _decode_data_url(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise OutputRejected("data: output is not base64")
        if len(payload) * 3 // 4 > self.max_bytes:
            raise OutputRejected(f"output too large: over {self.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise OutputRejected("data: output is not valid base64") from error

    async def aclose(self) -> None:
        await self.client.aclose()


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
