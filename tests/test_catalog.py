"""The model catalog: snapshots until Replicate answers, a refresh shared through Redis, the last good kept."""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from fake_replicate.models import FLUX_SCHNELL, openapi_schema
from mediagen.catalog.catalog import Catalog
from mediagen.core.errors import InvalidParameters
from mediagen.settings import DEFAULT_MODELS

SCHNELL = "black-forest-labs/flux-schnell"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def wider_schnell() -> dict[str, Any]:
    """flux-schnell as a newer version might describe it: up to 8 outputs."""
    schema = copy.deepcopy(openapi_schema(FLUX_SCHNELL))
    schema["components"]["schemas"]["Input"]["properties"]["num_outputs"]["maximum"] = 8
    return schema


async def newer(model: str) -> tuple[str, dict[str, Any]]:
    return "v2", wider_schnell()


async def unreachable(model: str) -> tuple[str, dict[str, Any]]:
    raise ConnectionError("Replicate cannot be reached")


async def nonsense(model: str) -> tuple[str, dict[str, Any]]:
    return "v3", {"components": {"schemas": {"Input": {"properties": "none"}}}}


def accepts(catalog: Catalog, **parameters: Any) -> bool:
    schema = catalog.get(SCHNELL)
    assert schema is not None
    try:
        schema.build_input("a cat", parameters)
    except InvalidParameters:
        return False
    return True


async def test_the_shipped_snapshots_serve_until_replicate_answers() -> None:
    catalog = Catalog(DEFAULT_MODELS)

    assert await catalog.refresh(unreachable, period=60) is False

    for model in DEFAULT_MODELS:
        schema = catalog.get(model)
        assert schema is not None and schema.source == "snapshot"
    assert accepts(catalog, num_outputs=4) and not accepts(catalog, num_outputs=5)


async def test_a_schema_refresh_that_fails_keeps_the_last_good_schema(redis: Redis) -> None:
    catalog = Catalog([SCHNELL], redis=redis, namespace=f"test-{uuid.uuid4().hex}")
    assert await catalog.refresh(newer, period=1e-9)
    assert catalog.get(SCHNELL).version == "v2"  # type: ignore[union-attr]
    assert accepts(catalog, num_outputs=8)

    assert await catalog.refresh(unreachable, period=1e-9) is False
    assert await catalog.refresh(nonsense, period=1e-9) is False

    schema = catalog.get(SCHNELL)
    assert schema is not None and (schema.version, schema.source) == ("v2", "replicate")
    assert accepts(catalog, num_outputs=8)


async def test_a_fetched_schema_is_shared_through_redis_and_not_fetched_again_within_the_period(
    redis: Redis,
) -> None:
    namespace = f"test-{uuid.uuid4().hex}"
    first = Catalog([SCHNELL], redis=redis, namespace=namespace)
    assert await first.refresh(newer, period=3600)

    second = Catalog([SCHNELL], redis=redis, namespace=namespace)  # another API process, or a restart
    assert second.get(SCHNELL).source == "snapshot"  # type: ignore[union-attr]
    assert await second.refresh(unreachable, period=3600)  # fresh in Redis: Replicate is not asked

    assert second.get(SCHNELL).version == "v2"  # type: ignore[union-attr]
    assert accepts(second, num_outputs=8)


def test_the_shipped_snapshots_and_the_fakes_own_copies_agree() -> None:
    """Two copies by design (the fake shares nothing with mediagen): this keeps them one contract."""
    import json
    from importlib import resources

    from fake_replicate.models import MODELS

    for model in DEFAULT_MODELS:
        snapshot = json.loads(
            resources.files("mediagen.catalog").joinpath("snapshots", model.replace("/", "__") + ".json").read_text()
        )
        assert snapshot["openapi_schema"] == openapi_schema(MODELS[model]), model
        assert snapshot["version"] == MODELS[model].version


def test_a_null_parameter_means_not_given_and_the_seed_is_still_chosen() -> None:
    schema = Catalog(["stability-ai/stable-diffusion-3.5-large"]).get("stability-ai/stable-diffusion-3.5-large")
    assert schema is not None

    sent = schema.build_input("a pond", {"seed": None, "negative_prompt": None}, default_output_format="png")

    assert isinstance(sent.pop("seed"), int)
    assert sent == {"prompt": "a pond", "output_format": "png"}
