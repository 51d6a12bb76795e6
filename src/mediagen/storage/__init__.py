"""Where images live: the `Storage` protocol and its adapters (local disk; S3/MinIO).

Every adapter refuses keys that are not ours (`ValueError`), never blocks the event loop, and raises
only `StorageUnavailable` (transient: the worker retries) or `StorageMisconfigured` (permanent).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

from mediagen.core.errors import StorageUnavailable

# Keys are ours alone: `<job uuid>/<index>.<ext>`, any index a prediction could make (up to 9 digits, so
# a file name stays short). Anything else is refused (no path traversal).
KEY_PATTERN = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/[0-9]{1,9}\.(png|jpg|webp|gif|mp4|webm)$"
)

CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
    "webm": "video/webm",
}

CHUNK_BYTES = 64 * 1024

ByteRange = tuple[int, int | None]
"""An HTTP byte range: the first byte and the last (inclusive; None: to the end)."""


def is_valid_key(key: str) -> bool:
    return KEY_PATTERN.fullmatch(key) is not None


def require_key(key: str) -> str:
    if not is_valid_key(key):
        raise ValueError(f"not a storage key: {key!r}")
    return key


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    content_type: str


class ObjectStream:
    """An open object: `size`, `content_type`, and its bytes as an async iterator of chunks.

    Each chunk is read off the event loop, so the whole object is never in memory at once. The stream
    closes itself at the end; a reader that stops early must `await stream.aclose()`.
    """

    def __init__(
        self,
        *,
        size: int,
        content_type: str,
        read: Callable[[int], bytes],
        close: Callable[[], None],
        executor: Executor | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        total: int | None = None,
        first: int = 0,
    ) -> None:
        self.size = size
        """Bytes this stream yields (the part, for a range)."""
        self.total = size if total is None else total
        """Bytes of the whole object."""
        self.first = first
        """Offset of the first byte yielded (0 unless a range was asked for)."""
        self.content_type = content_type
        self._read = read
        self._close = close
        self._executor = executor
        self._chunk_bytes = chunk_bytes
        self._closed = False

    def __aiter__(self) -> ObjectStream:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            chunk = await asyncio.get_running_loop().run_in_executor(self._executor, self._read, self._chunk_bytes)
        except Exception as error:
            await self.aclose()
            raise StorageUnavailable(f"reading the object failed: {type(error).__name__}") from error
        except BaseException:
            await self.aclose()
            raise
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close)


class Storage(Protocol):
    async def save(self, key: str, data: bytes, content_type: str, sha256: str) -> StoredObject:
        """Store `data` under `key` atomically: a reader sees the whole object or none of it."""

    async def exists(self, key: str) -> bool: ...

    async def open(self, key: str, byte_range: ByteRange | None = None) -> ObjectStream | None:
        """The object under `key` for streaming (only `byte_range` of it if given), or None when there is none.

        A range that starts past the end yields nothing (`size` 0, `first` >= `total`)."""

    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        """A URL anyone may GET the object from until it expires; None when the backend has none."""

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove these objects; one already gone is no error (a prune run again after a failure)."""

    async def check(self) -> None:
        """Raise StorageMisconfigured or StorageUnavailable when the store cannot be used."""
