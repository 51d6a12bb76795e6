"""fal wired as a provider: its settings, its adapter among the configured providers, and its own
budgets and circuit in Redis, apart from Replicate's (mediagen.services)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from fake_fal.config import FakeFalConfig
from fal_live import LiveFake, live_fake
from mediagen import services
from mediagen.core.errors import ProviderOutage, TransientProviderError
from mediagen.providers.fal import FalProvider
from mediagen.providers.replicate import ReplicateProvider
from mediagen.settings import Settings

SCHNELL = "fal-ai/flux/schnell"


@pytest.fixture(scope="module")
def fake() -> Iterator[LiveFake]:
    with live_fake(FakeFalConfig(latency=0.2, seed=5)) as running:
        yield running


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_fal_key_selects_the_real_fal_and_a_base_url_a_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAL_KEY", "key-id:secret")
    real = Settings(_env_file=None)  # type: ignore[call-arg]
    assert real.fal_configured and real.fal_base_url is None
    assert services.fal_webhook_verifier(real).jwks_url == "https://rest.alpha.fal.ai/.well-known/jwks.json"
    monkeypatch.delenv("FAL_KEY")
    monkeypatch.setenv("MEDIAGEN_FAL_BASE_URL", "http://127.0.0.1:5056/")
    stand_in = Settings(_env_file=None)  # type: ignore[call-arg]
    assert stand_in.fal_configured and stand_in.fal_key is None
    assert services.fal_webhook_verifier(stand_in).jwks_url == "http://127.0.0.1:5056/.well-known/jwks.json"
    monkeypatch.delenv("MEDIAGEN_FAL_BASE_URL")
    assert not Settings(_env_file=None).fal_configured  # type: ignore[call-arg]


async def test_each_configured_provider_gets_its_own_adapter() -> None:
    only_fal = services.providers(settings(fal_base_url="http://127.0.0.1:9"))
    both = services.providers(
        settings(fal_key="k", replicate_api_token="r8_x", replicate_base_url="http://127.0.0.1:9")
    )
    neither = services.providers(settings())
    try:
        assert list(only_fal) == ["fal"] and isinstance(only_fal["fal"], FalProvider)
        assert list(both) == ["replicate", "fal"]
        # As before fal: without any provider configured, Replicate (make run's fake, or a token later).
        assert list(neither) == ["replicate"] and isinstance(neither["replicate"], ReplicateProvider)
    finally:
        for built in (only_fal, both, neither):
            for provider in built.values():
                await provider.aclose()


def test_webhooks_are_on_with_a_public_base_url_unless_turned_off() -> None:
    public = settings(public_base_url="https://api.example.com/")
    assert public.replicate_webhook_url == "https://api.example.com/webhooks/replicate"
    assert public.fal_webhook_url == "https://api.example.com/webhooks/fal"
    off = settings(public_base_url="https://api.example.com", replicate_webhooks=False, fal_webhooks=False)
    assert off.replicate_webhook_url is None and off.fal_webhook_url is None
    assert settings().replicate_webhook_url is None and settings().fal_webhook_url is None
    with pytest.raises(ValueError, match="MEDIAGEN_FAL_WEBHOOKS needs MEDIAGEN_PUBLIC_BASE_URL"):
        _ = settings(fal_webhooks=True).fal_webhook_url
    own = settings(fal_webhook_base_url="https://hooks.example.com", replicate_webhooks=False)
    assert own.fal_webhook_url == "https://hooks.example.com/webhooks/fal" and own.replicate_webhook_url is None


async def test_fal_spends_its_own_budgets_in_redis(fake: LiveFake, redis: Redis, namespace: str) -> None:
    space = f"{namespace}-falwire-{uuid.uuid4().hex[:6]}"
    s = settings(fal_base_url=fake.url, redis_namespace=space)
    fal = services.fal_provider(s, redis)
    try:
        created = await fal.create(SCHNELL, {"prompt": f"a fox {uuid.uuid4().hex[:8]}"})
        await fal.get(created.id)
    finally:
        await fal.aclose()
    assert await redis.exists(f"{space}:fal-budget:create") == 1
    assert await redis.exists(f"{space}:fal-budget:other") == 1
    assert await redis.exists(f"{space}:replicate-budget:create") == 0


async def test_a_fal_outage_opens_fals_circuit_and_leaves_replicates_closed(
    fake: LiveFake, redis: Redis, namespace: str
) -> None:
    space = f"{namespace}-falwire-{uuid.uuid4().hex[:6]}"
    s = settings(fal_base_url=fake.url, redis_namespace=space, fal_circuit_failures=2, fal_circuit_open_seconds=30)
    fal = services.fal_provider(s, redis)
    fake.configure(p_status_503=1.0)
    try:
        created = await fal.create(SCHNELL, {"prompt": f"a fox {uuid.uuid4().hex[:8]}"})
        for _ in range(2):
            with pytest.raises(TransientProviderError) as failed:
                await fal.get(created.id)
            assert failed.value.http_status == 503
        calls_before = fake.stats()["calls"]
        with pytest.raises(ProviderOutage, match="fal is unavailable"):
            await fal.get(created.id)
        assert fake.stats()["calls"] == calls_before, "a call went out through an open circuit"
        with pytest.raises(ProviderOutage):
            await fal.create(SCHNELL, {"prompt": "never sent"})
    finally:
        fake.configure(p_status_503=0.0)
        await fal.aclose()
    assert await redis.hget(f"{space}:fal-circuit", "open_until") is not None
    assert await redis.exists(f"{space}:replicate-circuit") == 0
