"""With only fal configured (the fake fal; no Replicate at all), the README's walkthrough works end to end:
the API and a worker take the walkthrough's request, run it on fal, and serve its image."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import wait_for_job
from fake_fal.config import FakeFalConfig
from fal_live import LiveFake, live_fake

WALKTHROUGH = {"prompt": "a ninja drinking coffee", "parameters": {"width": 512, "height": 512}}


@pytest.fixture(scope="module")
def fake() -> Iterator[LiveFake]:
    with live_fake(FakeFalConfig(latency=0.3, seed=11)) as running:
        yield running


@pytest.fixture
def fal_only(make_stack: Any, fake: LiveFake) -> Any:
    """An API and a worker whose only provider is the fake fal (no Replicate token, no stand-in, no
    MEDIAGEN_PROVIDERS), with fal's webhooks to this API."""
    stack = make_stack(REPLICATE_BASE_URL="", REPLICATE_API_TOKEN="", MEDIAGEN_FAL_BASE_URL=fake.url)
    api_url = stack.start_api()
    # fal's own safety-net look, short; Replicate's, long: a lost fal webhook costs fal's.
    stack.start_worker(
        MEDIAGEN_FAL_WEBHOOK_BASE_URL=api_url,
        MEDIAGEN_FAL_WEBHOOK_POLL_SECONDS="1.5",
        MEDIAGEN_REPLICATE_WEBHOOK_POLL_SECONDS="60",
    )
    return stack


async def test_the_walkthrough_runs_on_fal_when_fal_is_the_only_provider(fal_only: Any, fake: LiveFake) -> None:
    prompt = f"{WALKTHROUGH['prompt']} #{uuid.uuid4().hex[:8]}"  # this test's own, in the fake's counters
    async with httpx.AsyncClient(base_url=fal_only.api.extra["url"], timeout=10) as api:
        submitted = await api.post("/generate", json={**WALKTHROUGH, "prompt": prompt})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["job_id"]

        status = await wait_for_job(api, job_id, timeout=30)
        assert status["status"] == "succeeded", status
        assert status["attempts"] == 1 and status["error"] is None
        image = await api.get(status["result_urls"][0])
        job = (await api.get(f"/jobs/{job_id}")).json()

    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (512, 512)
    assert [attempt["provider"] for attempt in job["attempt_history"]] == ["fal"]
    assert job["provider"] == "fal" and job["model"] == "black-forest-labs/flux-schnell"
    assert fake.stats()["by_prompt"].get(prompt) == 1, "one request at fal, not more"
    relayed = [
        line
        for line in fal_only.api.log_lines()
        if line.get("event") == "webhook.received" and line.get("provider") == "fal" and line.get("job_id") == job_id
    ]
    assert [line["outcome"] for line in relayed] == ["relayed"], "fal's webhook woke the worker"


async def test_a_lost_fal_webhook_costs_one_look_after_fals_own_poll_seconds(fal_only: Any) -> None:
    async with httpx.AsyncClient(base_url=fal_only.api.extra["url"], timeout=10) as api:
        started = time.monotonic()
        submitted = await api.post("/generate", json={"prompt": f"[[webhook:drop]] lost #{uuid.uuid4().hex[:8]}"})
        status = await wait_for_job(api, submitted.json()["job_id"], timeout=30)
    assert status["status"] == "succeeded", status
    assert time.monotonic() - started < 15, "waited for Replicate's 60 s look, not fal's 1.5 s"
