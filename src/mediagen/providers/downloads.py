"""Fetching a prediction's output files from the provider's delivery hosts, safely.

Only from hosts we trust (`replicate.delivery`, fal's `fal.media`, their subdomains, the stand-ins' own
hosts, and the `MEDIAGEN_DOWNLOAD_ALLOWED_HOSTS`), no redirects, at most `max_bytes`, over the lean transport
(mediagen.providers.transport) or httpx's own when a proxy is configured. A `data:` URL (some models
answer inline) is decoded under the same size bound. What the bytes are, and where they are stored,
is the worker's business (mediagen.worker.outputs).

The provider's token (Replicate's delivery URLs may ask for it) goes only where it belongs: over HTTPS to
the `token_hosts` (Replicate's delivery hosts and their subdomains), or to one of the `token_origins`
exactly (scheme, host and port: the configured stand-in). Never over plain HTTP to a real host, never to
fal's hosts or any other allowed host.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx

from mediagen.core.errors import OutputDownloadFailed, OutputRejected
from mediagen.providers.transport import LeanTransport, proxies_configured


class Downloader:
    def __init__(
        self,
        *,
        allowed_hosts: Sequence[str],
        max_bytes: int,
        timeout_seconds: float = 30.0,
        auth_token: str | None = None,
        token_hosts: Sequence[str] = (),
        token_origins: Sequence[str] = (),
        max_connections: int = 200,
    ) -> None:
        self.allowed_hosts = [host.lower() for host in allowed_hosts]
        self.max_bytes = max_bytes
        self._auth_token = auth_token
        self._token_hosts = [host.lower() for host in token_hosts]
        self._token_origins = {_origin(origin) for origin in token_origins}
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

    def sends_token(self, url: str) -> bool:
        """Would the token go with a GET of `url`? HTTPS to a token host, or exactly a token origin."""
        if not self._auth_token:
            return False
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme == "https" and any(host == h or host.endswith("." + h) for h in self._token_hosts):
            return True
        return _origin(url) in self._token_origins

    async def fetch(self, url: str) -> bytes:
        if url.startswith("data:"):
            return self._decode_data_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OutputRejected(f"output URL scheme not allowed: {parts.scheme or url[:20]!r}")
        if not self.host_allowed(parts.hostname):
            raise OutputRejected(f"output host not allowed: {parts.hostname}")
        headers = {}
        if self.sends_token(url):
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


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return ("", "", None)
    return (parts.scheme, (parts.hostname or "").lower(), port)
