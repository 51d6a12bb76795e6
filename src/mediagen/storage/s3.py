"""Images in an S3 bucket (MinIO, SeaweedFS, AWS S3) through the minio SDK.

The SDK blocks, so every call runs on this adapter's own small thread pool, sized like its
connection pool: slow storage then cannot starve the event loop's default executor, which DNS
lookups share. Objects carry their content type and `x-amz-meta-sha256`. A PUT is atomic in S3, so a
reader sees the whole object or none of it.

Errors: a refused connection, a timeout or a 5xx is `StorageUnavailable` (transient: the worker
retries the job); refused credentials, a bad endpoint or bucket name, or a server that does not
speak S3 is `StorageMisconfigured`. The HTTP layer retries once, quickly; the job's retry policy
does the rest.

The credentials need GetObject, PutObject and HeadBucket (ListBucket); CreateBucket only if the
bucket does not exist yet (`check()` and the first save into a missing bucket create it).
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import check_bucket_name

from mediagen.core.errors import StorageError, StorageMisconfigured, StorageUnavailable
from mediagen.storage import CONTENT_TYPES, ByteRange, ObjectStream, StoredObject, require_key

T = TypeVar("T")

# S3 error codes worth another attempt; every other code means the request itself is wrong.
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})
MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket"})
EXISTING_BUCKET_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})


def _nothing() -> None:
    return None


class S3Storage:
    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        region: str = "us-east-1",
        secure: bool = False,
        public_url: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        max_connections: int = 16,
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=max_connections,
            retries=urllib3.Retry(
                total=1,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
                raise_on_status=False,  # the last answer reaches the SDK, which names the error
            ),
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        try:
            check_bucket_name(bucket)
            self._client = Minio(
                endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http
            )
            self._signer = self._client
            if public_url:
                # SigV4 signs the host, so URLs for clients are signed for the host they will use.
                public = urlsplit(public_url)
                if public.scheme not in ("http", "https") or not public.netloc or public.path.strip("/"):
                    raise ValueError(f"public URL must be scheme://host[:port], not {public_url!r}")
                self._signer = Minio(
                    public.netloc,
                    access_key=access_key,
                    secret_key=secret_key,
                    secure=public.scheme == "https",
                    region=region,
                )
        except ValueError as error:
            raise StorageMisconfigured(f"S3 storage {endpoint!r}, bucket {bucket!r}: {error}") from error
        self._executor = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="mediagen-s3")

    async def _run(self, action: str, call: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except Exception as error:
            raise _translate(f"{action} ({self.endpoint}/{self.bucket})", error) from error

    async def save(self, key: str, data: bytes, content_type: str, sha256: str) -> StoredObject:
        require_key(key)

        def put() -> None:
            self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata={"sha256": sha256}
            )

        try:
            await self._run(f"saving {key}", put)
        except StorageMisconfigured as error:
            if not isinstance(error.__cause__, S3Error) or error.__cause__.code != "NoSuchBucket":
                raise
            await self.check()
            await self._run(f"saving {key}", put)
        return StoredObject(key=key, size=len(data), content_type=content_type)

    async def exists(self, key: str) -> bool:
        require_key(key)

        def stat() -> bool:
            try:
                self._client.stat_object(self.bucket, key)
            except S3Error as error:
                if error.code in MISSING_CODES:
                    return False
                raise
            return True

        return await self._run(f"looking up {key}", stat)

    async def open(self, key: str, byte_range: ByteRange | None = None) -> ObjectStream | None:
        require_key(key)
        first, last = byte_range or (0, None)

        def get() -> ObjectStream | None:
            try:
                want = 0 if last is None else last - first + 1  # 0: to the end (the SDK's convention)
                response = self._client.get_object(self.bucket, key, offset=first, length=want)
            except S3Error as error:
                if error.code in MISSING_CODES:
                    return None
                if error.code == "InvalidRange":  # starts past the end: say how long the object is
                    stat = self._client.stat_object(self.bucket, key)
                    content_type = stat.content_type or CONTENT_TYPES[key.rsplit(".", 1)[1]]
                    size = stat.size or 0
                    return ObjectStream(
                        size=0, total=size, first=first, content_type=content_type, read=lambda n: b"", close=_nothing
                    )
                raise

            def close() -> None:
                response.close()
                response.release_conn()

            length = response.headers.get("content-length")
            if length is None or not length.isdigit():
                close()
                raise ValueError("the server sent no Content-Length")
            # A ranged answer says the whole size in `Content-Range: bytes a-b/total`.
            total = response.headers.get("content-range", "").rpartition("/")[2]
            return ObjectStream(
                size=int(length),
                total=int(total) if total.isdigit() else None,
                first=first,
                content_type=response.headers.get("content-type") or CONTENT_TYPES[key.rsplit(".", 1)[1]],
                read=response.read,
                close=close,
                executor=self._executor,
            )

        return await self._run(f"opening {key}", get)

    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        require_key(key)
        expires = timedelta(seconds=expires_seconds)
        # Signing is local (the region is known): no request is sent.
        return await self._run(
            f"presigning {key}", lambda: self._signer.presigned_get_object(self.bucket, key, expires)
        )

    async def delete(self, keys: Sequence[str]) -> None:
        objects = [DeleteObject(require_key(key)) for key in keys]

        def remove() -> list[str]:
            failed = []
            for start in range(0, len(objects), 1000):  # at most 1,000 keys per DeleteObjects request
                for error in self._client.remove_objects(self.bucket, objects[start : start + 1000]):
                    if error.code not in MISSING_CODES:
                        failed.append(f"{error.name}: {error.code}")
            return failed

        if not objects:
            return
        failed = await self._run(f"deleting {len(objects)} objects", remove)
        if failed:
            transient = all(line.rsplit(": ", 1)[1] in TRANSIENT_CODES for line in failed)
            kind: type[StorageError] = StorageUnavailable if transient else StorageMisconfigured
            raise kind(f"deleting from {self.endpoint}/{self.bucket}: {len(failed)} failed, first {failed[0]}")

    async def check(self) -> None:
        def ensure_bucket() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as error:
                if error.code not in EXISTING_BUCKET_CODES:
                    raise

        await self._run(f"checking bucket {self.bucket}", ensure_bucket)


def _translate(context: str, error: Exception) -> StorageError:
    if isinstance(error, S3Error):
        status = error.response.status
        kind: type[StorageError] = (
            StorageUnavailable if status >= 500 or error.code in TRANSIENT_CODES else StorageMisconfigured
        )
        return kind(f"{context}: {error.code} (HTTP {status})", http_status=status)
    if isinstance(error, ServerError):
        kind = StorageUnavailable if error.status_code >= 500 else StorageMisconfigured
        return kind(f"{context}: HTTP {error.status_code}", http_status=error.status_code)
    if isinstance(error, InvalidResponseError):
        # Not S3's XML: a proxy's 502 page is transient; a 4xx from some other server is a wrong endpoint.
        status = int(getattr(error, "_code", 0) or 0)
        kind = StorageUnavailable if status >= 500 else StorageMisconfigured
        return kind(f"{context}: HTTP {status} that is not an S3 answer", http_status=status or None)
    if isinstance(error, urllib3.exceptions.HTTPError | OSError):
        return StorageUnavailable(f"{context}: {type(error).__name__}")
    return StorageMisconfigured(f"{context}: {type(error).__name__}: {error}")
