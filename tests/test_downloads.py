"""Where outputs may come from, and where Replicate's token may go (mediagen.providers.downloads, built by
mediagen.services.downloader): fal's hosts are allowed, and the token goes only over HTTPS to Replicate's
delivery hosts or to the configured fake, never to another host."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from mediagen import services
from mediagen.core.errors import OutputRejected
from mediagen.settings import Settings

PNG = b"\x89PNG\r\n\x1a\n" + b"0" * 32


class Recorder:
    """A plain HTTP server that answers PNG bytes and keeps each request's headers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = (line.partition(":") for line in head.split("\r\n")[1:] if line)
        self.requests.append({name.strip().lower(): value.strip() for name, _, value in lines})
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: %d\r\n\r\n%s" % (len(PNG), PNG))
        await writer.drain()
        writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def two_hosts() -> AsyncIterator[tuple[Recorder, Recorder]]:
    """The configured fake Replicate, and another server on the same machine (say, the fake fal)."""
    fake, other = Recorder(), Recorder()
    for recorder in (fake, other):
        recorder.server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    yield fake, other
    for recorder in (fake, other):
        assert recorder.server is not None
        recorder.server.close()


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def test_the_token_goes_to_the_configured_fake_and_to_no_other_host(two_hosts: tuple[Recorder, Recorder]) -> None:
    fake, other = two_hosts
    downloader = services.downloader(
        settings(replicate_api_token="r8_secret", replicate_base_url=fake.url, fal_base_url=other.url)
    )
    try:
        assert await downloader.fetch(f"{fake.url}/files/a.png") == PNG
        assert await downloader.fetch(f"{other.url}/files/0.png") == PNG  # same host, another port
    finally:
        await downloader.aclose()
    assert fake.requests[0].get("authorization") == "Bearer r8_secret"
    assert "authorization" not in other.requests[0]


def test_the_token_goes_only_over_https_to_replicates_delivery_hosts() -> None:
    downloader = services.downloader(settings(replicate_api_token="r8_secret"))
    assert downloader.sends_token("https://replicate.delivery/xezq/out-0.webp")
    assert downloader.sends_token("https://pbxt.replicate.delivery/out-0.png")
    assert not downloader.sends_token("http://replicate.delivery/xezq/out-0.webp")  # plain HTTP
    assert not downloader.sends_token("https://replicate.delivery.example.com/out-0.png")
    assert not downloader.sends_token("https://notreplicate.delivery/out-0.png")
    assert not downloader.sends_token("https://v3.fal.media/files/out.png")
    assert not downloader.sends_token("http://127.0.0.1:5000/files/a.png")  # no fake configured


async def test_outputs_may_come_from_fals_hosts_and_its_stand_in() -> None:
    downloader = services.downloader(settings(fal_base_url="http://127.0.0.1:5056"))
    try:
        for host in ("fal.media", "v3.fal.media", "v2.fal.media", "replicate.delivery", "127.0.0.1"):
            assert downloader.host_allowed(host), host
        for host in ("fal.media.example.com", "evilfal.media", "example.com"):
            assert not downloader.host_allowed(host), host
        with pytest.raises(OutputRejected):
            await downloader.fetch("https://fal.media.example.com/x.png")
    finally:
        await downloader.aclose()
