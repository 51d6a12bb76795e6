"""The storage contract, held by both adapters: local disk and S3 (a real SeaweedFS server).

Both store bytes with their content type, hand them back in chunks, never show a half-written object,
refuse keys that are not ours, and report a broken store as StorageMisconfigured (permanent) or
StorageUnavailable (transient). The media route serves either one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conftest import submit, unique, wait_for_job
from mediagen.api.auth import KeyRing
from mediagen.api.routes.media import router
from mediagen.core.errors import StorageMisconfigured, StorageUnavailable
from mediagen.providers.downloads import Downloader
from mediagen.settings import Settings
from mediagen.storage import ObjectStream, Storage
from mediagen.storage.local import LocalStorage
from mediagen.storage.s3 import S3Storage
from mediagen.worker.outputs import store_outputs
from s3server import S3Server, free_ports, start_s3_server

# A fixed id keeps parametrised test ids the same in every test process (pytest-xdist compares them).
SOME_JOB = "3f0c6a2e-8d41-4c5b-9a7e-1b2c3d4e5f60"

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 400  # about 100 KiB: several chunks


def new_key(ext: str = "png") -> str:
    return f"{uuid.uuid4()}/0.{ext}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def read_all(stream: ObjectStream) -> bytes:
    return b"".join([chunk async for chunk in stream])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    # No skip: a machine without the server must fail these tests, not pass them quietly.
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


def s3_storage(
    server: S3Server, bucket: str, *, secret_key: str | None = None, public_url: str | None = None
) -> S3Storage:
    return S3Storage(
        endpoint=server.endpoint,
        access_key=server.access_key,
        secret_key=secret_key or server.secret_key,
        bucket=bucket,
        public_url=public_url,
    )


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> str:
    bucket = f"contract-{uuid.uuid4().hex[:8]}"
    s3_server.client().make_bucket(bucket)
    return bucket


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "media")
    server: S3Server = request.getfixturevalue("s3_server")
    return s3_storage(server, request.getfixturevalue("s3_bucket"))


# --- the contract -------------------------------------------------------------------------------


async def test_a_saved_object_reads_back_with_its_bytes_type_and_size(storage: Storage) -> None:
    key = new_key()

    stored = await storage.save(key, PNG, "image/png", sha256(PNG))
    stream = await storage.open(key)

    assert stored.key == key and stored.size == len(PNG) and stored.content_type == "image/png"
    assert stream is not None
    assert (stream.size, stream.content_type) == (len(PNG), "image/png")
    chunks = [chunk async for chunk in stream]
    assert len(chunks) > 1, "read in chunks, not as one piece"
    assert b"".join(chunks) == PNG


async def test_a_missing_object_opens_as_none_and_does_not_exist(storage: Storage) -> None:
    key = new_key()

    assert await storage.open(key) is None
    assert await storage.exists(key) is False
    await storage.save(key, PNG, "image/png", sha256(PNG))
    assert await storage.exists(key) is True


async def test_a_reader_may_stop_early_and_close_the_stream(storage: Storage) -> None:
    key = new_key()
    await storage.save(key, PNG, "image/png", sha256(PNG))

    for _ in range(20):  # more than the S3 adapter's connection pool
        stream = await storage.open(key)
        assert stream is not None
        assert len(await anext(stream)) > 0
        await stream.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(stream)

    stream = await storage.open(key)
    assert stream is not None and await read_all(stream) == PNG


async def test_a_reader_never_sees_a_partial_object(storage: Storage) -> None:
    # Given a key being written, and rewritten, with large objects
    key = new_key()
    size = 3 * 1024 * 1024
    versions = [bytes([ord("a") + n]) * size for n in range(3)]
    whole = {sha256(version) for version in versions}
    seen: list[str | None] = []  # digests: a few hundred reads of 3 MiB would not fit in memory
    writing = True

    async def write() -> None:
        nonlocal writing
        for n in range(6):
            await storage.save(key, versions[n % 3], "image/png", sha256(versions[n % 3]))
            await asyncio.sleep(0)
        writing = False

    async def read() -> None:
        while writing:
            stream = await storage.open(key)
            seen.append(None if stream is None else sha256(await read_all(stream)))
            await asyncio.sleep(0)

    # When readers read all the while
    await asyncio.gather(write(), read(), read())

    # Then each read is no object or one whole version, never a mix or a prefix
    assert seen, "the readers never ran"
    assert all(digest is None or digest in whole for digest in seen), "a partial or mixed object"
    assert any(digest is not None for digest in seen)


@pytest.mark.parametrize(
    "key",
    [
        "../etc/passwd",
        "../../0.png",
        "not-a-uuid/0.png",
        f"{SOME_JOB}/0.exe",
        f"{SOME_JOB}/../0.png",
        f"/{SOME_JOB}/0.png",
        f"{SOME_JOB}/1234567890.png",  # an index longer than any prediction makes
        "",
    ],
)
async def test_keys_that_are_not_ours_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        await storage.save(key, PNG, "image/png", sha256(PNG))
    with pytest.raises(ValueError):
        await storage.open(key)
    with pytest.raises(ValueError):
        await storage.exists(key)
    with pytest.raises(ValueError):
        await storage.presigned_url(key, 60)


async def test_check_passes_on_a_usable_store(storage: Storage) -> None:
    await storage.check()
    await storage.check()


# --- presigned URLs -----------------------------------------------------------------------------


async def test_local_storage_has_no_presigned_urls(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    key = new_key()
    await storage.save(key, PNG, "image/png", sha256(PNG))

    assert await storage.presigned_url(key, 60) is None


async def test_an_s3_presigned_url_serves_the_object_to_anyone(s3_server: S3Server, s3_bucket: str) -> None:
    storage = s3_storage(s3_server, s3_bucket)
    key = new_key()
    await storage.save(key, PNG, "image/png", sha256(PNG))

    url = await storage.presigned_url(key, 60)

    assert url is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
        tampered = await client.get(url.replace(key, new_key()))
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert tampered.status_code == 403


async def test_s3_objects_carry_their_sha256(s3_server: S3Server, s3_bucket: str) -> None:
    storage = s3_storage(s3_server, s3_bucket)
    key = new_key()
    await storage.save(key, PNG, "image/png", sha256(PNG))

    stat = await asyncio.to_thread(s3_server.client().stat_object, s3_bucket, key)

    assert stat.metadata["x-amz-meta-sha256"] == sha256(PNG)
    assert stat.content_type == "image/png"


async def test_presigned_urls_are_signed_for_the_public_url(s3_server: S3Server, s3_bucket: str) -> None:
    storage = s3_storage(s3_server, s3_bucket, public_url="https://images.example.com")

    url = await storage.presigned_url(new_key(), 60)

    assert url is not None and url.startswith(f"https://images.example.com/{s3_bucket}/")


# --- a broken store -------------------------------------------------------------------------------


async def test_check_creates_a_missing_bucket(s3_server: S3Server) -> None:
    bucket = f"fresh-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    assert not await asyncio.to_thread(client.bucket_exists, bucket)

    await s3_storage(s3_server, bucket).check()
    await s3_storage(s3_server, bucket).check()  # a bucket that exists is fine too

    assert await asyncio.to_thread(client.bucket_exists, bucket)


async def test_a_save_into_a_missing_bucket_creates_it(s3_server: S3Server) -> None:
    storage = s3_storage(s3_server, f"fresh-{uuid.uuid4().hex[:8]}")
    key = new_key()

    await storage.save(key, PNG, "image/png", sha256(PNG))

    stream = await storage.open(key)
    assert stream is not None and await read_all(stream) == PNG


async def test_a_wrong_secret_key_is_misconfigured(s3_server: S3Server, s3_bucket: str) -> None:
    storage = s3_storage(s3_server, s3_bucket, secret_key="not-the-secret")

    with pytest.raises(StorageMisconfigured):
        await storage.check()
    with pytest.raises(StorageMisconfigured):
        await storage.save(new_key(), PNG, "image/png", sha256(PNG))
    with pytest.raises(StorageMisconfigured):
        await storage.open(new_key())


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "127.0.0.1:9000/media", "127.0.0.1:port"])
def test_an_endpoint_that_is_not_host_and_port_is_misconfigured(endpoint: str) -> None:
    with pytest.raises(StorageMisconfigured):
        S3Storage(endpoint=endpoint, access_key="key", secret_key="secret", bucket="mediagen")


async def test_an_unreachable_endpoint_is_unavailable() -> None:
    (closed_port,) = free_ports(1)
    storage = S3Storage(endpoint=f"127.0.0.1:{closed_port}", access_key="key", secret_key="secret", bucket="mediagen")
    started = time.monotonic()

    with pytest.raises(StorageUnavailable):
        await storage.check()
    with pytest.raises(StorageUnavailable):
        await storage.save(new_key(), PNG, "image/png", sha256(PNG))
    with pytest.raises(StorageUnavailable):
        await storage.open(new_key())
    with pytest.raises(StorageUnavailable):
        await storage.exists(new_key())

    assert time.monotonic() - started < 5


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers: a hung S3 server."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    done.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


async def test_a_server_that_never_answers_is_unavailable_after_the_read_timeout(silent_server: str) -> None:
    storage = S3Storage(endpoint=silent_server, access_key="k", secret_key="s", bucket="mediagen", read_timeout=0.3)
    started = time.monotonic()

    with pytest.raises(StorageUnavailable):
        await storage.save(new_key(), PNG, "image/png", sha256(PNG))

    assert time.monotonic() - started < 3


class CannedS3(http.server.BaseHTTPRequestHandler):
    """Answers every request with the class's status, content type and body."""

    status = 503
    content_type = "application/xml"
    body = b""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_GET = do_PUT = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


SLOW_DOWN = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>reduce your rate</Message></Error>"


@pytest.mark.parametrize(
    ("status", "content_type", "body", "expected"),
    [
        (503, "application/xml", SLOW_DOWN, StorageUnavailable),
        (500, "application/xml", b"", StorageUnavailable),
        (502, "text/html", b"<html>bad gateway</html>", StorageUnavailable),
        (404, "text/html", b"<html>no such page</html>", StorageMisconfigured),
    ],
    ids=["s3-503", "s3-500-empty", "proxy-502", "not-s3-404"],
)
async def test_server_errors_are_transient_and_a_server_that_is_not_s3_is_misconfigured(
    status: int, content_type: str, body: bytes, expected: type[Exception]
) -> None:
    handler = type("Handler", (CannedS3,), {"status": status, "content_type": content_type, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        storage = S3Storage(
            endpoint=f"127.0.0.1:{server.server_address[1]}", access_key="k", secret_key="s", bucket="mediagen"
        )
        with pytest.raises(expected):
            await storage.save(new_key(), PNG, "image/png", sha256(PNG))
        with pytest.raises(expected):
            await storage.check()
    finally:
        server.shutdown()
        server.server_close()


# --- the media route, over either store -----------------------------------------------------------


def media_app(storage: Storage, *, redirect: bool = False) -> httpx.AsyncClient:
    """The API's routes over `storage` alone (the media route needs no database without API keys)."""
    app = FastAPI()
    app.include_router(router)
    app.state.api = SimpleNamespace(
        settings=Settings(_env_file=None, media_redirect=redirect, media_presign_seconds=60),
        storage=storage,
        keyring=KeyRing([]),
        limits=None,
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


@pytest.fixture
async def media_client(storage: Storage, request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    async with media_app(storage, redirect=getattr(request, "param", False)) as client:
        yield client


async def test_media_serves_the_stored_bytes_for_a_year(storage: Storage, media_client: httpx.AsyncClient) -> None:
    key = new_key()
    await storage.save(key, PNG, "image/png", sha256(PNG))

    response = await media_client.get(f"/media/{key}")

    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-length"] == str(len(PNG))
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"


async def test_media_serves_byte_ranges_for_video_players(storage: Storage, media_client: httpx.AsyncClient) -> None:
    key = new_key("mp4")
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8
    await storage.save(key, video, "video/mp4", sha256(video))

    part = await media_client.get(f"/media/{key}", headers={"Range": "bytes=4-11"})
    rest = await media_client.get(f"/media/{key}", headers={"Range": "bytes=2000-"})
    beyond = await media_client.get(f"/media/{key}", headers={"Range": f"bytes={len(video)}-"})
    whole = await media_client.get(f"/media/{key}")

    assert part.status_code == 206 and part.content == b"ftypmp42"
    assert part.headers["content-range"] == f"bytes 4-11/{len(video)}"
    assert part.headers["content-type"] == "video/mp4"
    assert rest.status_code == 206 and rest.content == video[2000:]
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(video)}"
    assert whole.status_code == 200 and whole.content == video and whole.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize("media_client", [False, True], indirect=True, ids=["stream", "redirect"])
async def test_media_answers_404_json_for_a_missing_image(media_client: httpx.AsyncClient) -> None:
    for path in (f"/media/{new_key()}", f"/media/{new_key('exe')}", "/media/whatever.png"):
        response = await media_client.get(path)

        assert response.status_code == 404, path
        assert response.json()["error"] == "not_found"


@pytest.mark.parametrize("media_client", [True], indirect=True, ids=["redirect"])
async def test_media_redirects_to_a_presigned_url_when_asked(storage: Storage, media_client: httpx.AsyncClient) -> None:
    key = new_key()
    await storage.save(key, PNG, "image/png", sha256(PNG))

    response = await media_client.get(f"/media/{key}")

    if isinstance(storage, LocalStorage):  # no presigned URLs: the bytes themselves
        assert response.status_code == 200 and response.content == PNG
        return
    assert response.status_code == 307
    async with httpx.AsyncClient() as client:
        image = await client.get(response.headers["location"])
    assert image.status_code == 200 and image.content == PNG


@pytest.mark.parametrize("redirect", [False, True], ids=["stream", "redirect"])
async def test_media_answers_503_when_the_store_is_unreachable(redirect: bool) -> None:
    (closed_port,) = free_ports(1)
    storage = S3Storage(endpoint=f"127.0.0.1:{closed_port}", access_key="key", secret_key="secret", bucket="mediagen")

    async with media_app(storage, redirect=redirect) as client:
        response = await client.get(f"/media/{new_key()}")

    assert response.status_code == 503
    assert response.json()["error"] == "service_unavailable"
    assert response.headers["retry-after"] == "5"


# --- the whole service on S3 --------------------------------------------------------------------------


async def test_a_job_stores_its_images_in_s3_and_the_api_serves_them(make_stack: Any, s3_server: S3Server) -> None:
    # Given an API and a worker on S3, with a bucket nobody has created yet
    bucket = f"service-{uuid.uuid4().hex[:8]}"
    stack = make_stack(
        MEDIAGEN_STORAGE_BACKEND="s3",
        MEDIAGEN_S3_ENDPOINT=s3_server.endpoint,
        MEDIAGEN_S3_ACCESS_KEY=s3_server.access_key,
        MEDIAGEN_S3_SECRET_KEY=s3_server.secret_key,
        MEDIAGEN_S3_BUCKET=bucket,
    )
    stack.start_worker()
    url = stack.start_api()

    async with httpx.AsyncClient(base_url=url, timeout=10) as api:
        # When a job succeeds
        job_id = await submit(api, unique("a lighthouse in s3"))
        status = await wait_for_job(api, job_id)
        assert status["status"] == "succeeded", status
        (result_url,) = status["result_urls"]
        detail = (await api.get(f"/jobs/{job_id}")).json()
        image = await api.get(result_url)
        ready = await api.get("/readyz")

    # Then its image is in the bucket, with its digest, and the API streams the same bytes
    (output,) = detail["outputs"]
    key = result_url.removeprefix("/media/")
    stat = await asyncio.to_thread(s3_server.client().stat_object, bucket, key)
    assert stat.size == output["size_bytes"]
    assert stat.metadata["x-amz-meta-sha256"] == output["sha256"]
    assert image.status_code == 200
    assert hashlib.sha256(image.content).hexdigest() == output["sha256"]
    assert image.headers["content-type"] == output["content_type"]
    assert ready.json()["checks"]["storage"] == "ok"


async def test_deleted_objects_are_gone_and_one_already_gone_is_no_error(storage: Storage) -> None:
    kept, deleted, never = new_key(), new_key(), new_key()
    for key in (kept, deleted):
        await storage.save(key, PNG, "image/png", sha256(PNG))

    await storage.delete([deleted, never])
    await storage.delete([deleted])  # a prune run again after a failure

    assert not await storage.exists(deleted)
    assert await storage.exists(kept)


async def test_a_local_save_fsyncs_the_file_and_its_folder_before_it_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Durability itself needs a power cut to observe; the OS calls that give it can be watched.
    synced: list[str] = []
    real_fsync = os.fsync

    def watched_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watched_fsync)
    storage = LocalStorage(tmp_path)
    key = new_key()
    await storage.save(key, PNG, "image/png", sha256(PNG))

    folder = tmp_path / key.split("/")[0]
    assert synced[0].startswith(f"{folder}/.part-")  # the bytes, before the rename
    assert synced[1:] == [str(folder), str(tmp_path)]  # the rename, then the new job folder
    assert (tmp_path / key).read_bytes() == PNG
    assert [path.name for path in folder.iterdir()] == ["0.png"]  # no temp file left behind


async def test_a_prediction_with_over_a_hundred_outputs_stores_and_serves_them_all(
    storage: Storage, media_client: httpx.AsyncClient
) -> None:
    job_id = uuid.uuid4()
    images = [PNG[:1000] + index.to_bytes(2, "big") for index in range(101)]
    output = [f"data:image/png;base64,{base64.b64encode(image).decode()}" for image in images]
    downloader = Downloader(allowed_hosts=[], max_bytes=len(PNG))
    try:
        stored = await store_outputs(downloader, storage, job_id, output)
    finally:
        await downloader.aclose()

    assert [item.storage_key for item in stored[99:]] == [f"{job_id}/99.png", f"{job_id}/100.png"]
    for index in (0, 99, 100):
        response = await media_client.get(f"/media/{job_id}/{index}.png")
        assert response.status_code == 200
        assert response.content == images[index]
