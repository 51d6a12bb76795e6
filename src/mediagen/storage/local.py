"""Images on local disk: atomic writes (temp file, then rename) done off the event loop."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from mediagen.errors import StorageMisconfigured, StorageUnavailable
from mediagen.storage import StoredObject, is_valid_key


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        if not is_valid_key(key):
            raise ValueError(f"not a storage key: {key!r}")
        return self.root / key

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def save(self, key: str, data: bytes, content_type: str, sha256: str) -> StoredObject:
        try:
            await asyncio.to_thread(self._write, self.path(key), data)
        except OSError as error:
            raise StorageUnavailable(f"cannot write {key}: {error.strerror}") from error
        return StoredObject(key=key, size=len(data), content_type=content_type)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path(key).is_file)

    async def check(self) -> None:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise StorageMisconfigured(f"media directory {self.root} is not writable")

        try:
            await asyncio.to_thread(probe)
        except OSError as error:
            raise StorageMisconfigured(f"media directory {self.root}: {error.strerror}") from error
