"""Images on local disk: durable atomic writes (temp file, fsync, rename, fsync of the folder) off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from mediagen.core.errors import StorageMisconfigured, StorageUnavailable
from mediagen.storage import CONTENT_TYPES, ByteRange, ObjectStream, StoredObject, require_key


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        return self.root / require_key(key)

    def _write(self, path: Path, data: bytes) -> None:
        new_folder = not path.parent.is_dir()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # the bytes on disk before the name points at them
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # the rename itself survives a power loss
        if new_folder:
            _fsync_dir(path.parent.parent)  # and so does the job's folder it is in

    async def save(self, key: str, data: bytes, content_type: str, sha256: str) -> StoredObject:
        try:
            await asyncio.to_thread(self._write, self.path(key), data)
        except OSError as error:
            raise StorageUnavailable(f"cannot write {key}: {error.strerror}") from error
        return StoredObject(key=key, size=len(data), content_type=content_type)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path(key).is_file)

    async def open(self, key: str, byte_range: ByteRange | None = None) -> ObjectStream | None:
        path = self.path(key)
        first, last = byte_range or (0, None)

        def open_file() -> tuple[BinaryIO, int]:
            handle = path.open("rb")
            if first:
                handle.seek(first)
            return handle, os.fstat(handle.fileno()).st_size

        try:
            # The open handle keeps reading the file it opened, even if a rename replaces the name.
            handle, size = await asyncio.to_thread(open_file)
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as error:
            raise StorageUnavailable(f"cannot read {key}: {error.strerror}") from error
        end = size if last is None else min(last + 1, size)
        remaining = [max(end - first, 0)]

        def read(limit: int) -> bytes:
            chunk = handle.read(min(limit, remaining[0])) if remaining[0] else b""
            remaining[0] -= len(chunk)
            return chunk

        return ObjectStream(
            size=max(end - first, 0),
            total=size,
            first=first,
            content_type=CONTENT_TYPES[key.rsplit(".", 1)[1]],
            read=read,
            close=handle.close,
        )

    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        require_key(key)
        return None

    async def delete(self, keys: Sequence[str]) -> None:
        paths = [self.path(key) for key in keys]

        def remove() -> None:
            for path in paths:
                path.unlink(missing_ok=True)
            for folder in {path.parent for path in paths}:  # the job's folder, once it is empty
                with contextlib.suppress(OSError):  # not empty (another output), or gone already
                    folder.rmdir()

        try:
            await asyncio.to_thread(remove)
        except OSError as error:
            raise StorageUnavailable(f"cannot delete media: {error.strerror}") from error

    async def check(self) -> None:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise StorageMisconfigured(f"media directory {self.root} is not writable")

        try:
            await asyncio.to_thread(probe)
        except OSError as error:
            raise StorageMisconfigured(f"media directory {self.root}: {error.strerror}") from error
