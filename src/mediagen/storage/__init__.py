"""Where images live: the `Storage` protocol and its adapters (local disk; S3/MinIO)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

# Keys are ours alone: `<job uuid>/<index>.<ext>`. Anything else is refused (no path traversal).
KEY_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/[0-9]{1,2}\.(png|jpg|webp|gif)$")

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}


def is_valid_key(key: str) -> bool:
    return KEY_PATTERN.fullmatch(key) is not None


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    content_type: str


class Storage(Protocol):
    async def save(self, key: str, data: bytes, content_type: str, sha256: str) -> StoredObject:
        """Store `data` under `key` atomically: a reader sees the whole object or none of it."""

    async def exists(self, key: str) -> bool: ...

    async def check(self) -> None:
        """Raise StorageMisconfigured or StorageUnavailable when the store cannot be used."""
