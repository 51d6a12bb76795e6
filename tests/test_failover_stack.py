"""Failover through the whole stack: with Replicate and fal both configured and the fake Replicate in an
outage (503 everywhere, `POST /_fake/outage`), new jobs for a model fal serves succeed on fal, each attempt
says which provider ran it, and no job is billed twice."""

from __future__ import annotations

from typing import Any

import httpx

from conftest import private_fake, submit, unique, wait_for_job
from fake_fal.config import FakeFalConfig
from fal_live import live_fake


async def test_during_a_replicate_outage_new_jobs_succeed_on_fal_each_billed_once(
    make_stack: Any, workdir: Any
) -> None:
    with (
        private_fake(workdir, "failover-fake", latency=0.3) as replicate,
        live_fake(FakeFalConfig(latency=0.3, seed=3)) as fal,
    ):
        stack = make_stack(
            REPLICATE_BASE_URL=replicate.url,
            MEDIAGEN_FAL_BASE_URL=fal.url,
            MEDIAGEN_REPLICATE_CIRCUIT_FAILURES="3",
            MEDIAGEN_REPLICATE_CIRCUIT_OPEN_SECONDS="30",
        )
        worker = stack.start_worker()
        api_url = stack.start_api()
        httpx.post(f"{replicate.url}/_fake/outage", json={"seconds": 300}).raise_for_status()
        prompts = [unique(f"a red kite over the dunes {n}") for n in range(8)]
        async with httpx.AsyncClient(base_url=api_url, timeout=20) as api:
            models = (await api.get("/models")).json()["models"]
            ids = [await submit(api, prompt, width=512, height=512) for prompt in prompts]
            finished = [await wait_for_job(api, job_id, timeout=60) for job_id in ids]
            views = [(await api.get(f"/jobs/{job_id}")).json() for job_id in ids]
            usage = (await api.get("/usage")).json()
        made_at_replicate = [replicate.predictions_for(prompt) for prompt in prompts]
        made_at_fal = fal.stats()["requests"]

    schnell = next(m for m in models if m["model"] == "black-forest-labs/flux-schnell")
    assert [route["provider"] for route in schnell["routes"]] == ["replicate", "fal"]
    assert [body["status"] for body in finished] == ["succeeded"] * len(ids)
    for view in views:
        attempts = view["attempt_history"]
        *before, last = attempts
        assert (last["provider"], last["outcome"], last["failover_from"]) == ("fal", "succeeded", "replicate")
        assert last["prediction_id"].startswith("fal-ai/flux/")
        assert all(a["provider"] == "replicate" and a["prediction_id"] is None for a in before)
        assert view["provider"] == "fal" and view["input"]["image_size"] == {"width": 512, "height": 512}
        # billed once: one prediction in all, at fal, priced per megapixel
        assert [a["prediction_id"] for a in attempts if a["prediction_id"]] == [last["prediction_id"]]
        assert last["cost_usd"] is not None
    assert made_at_replicate == [0] * len(prompts) and made_at_fal == len(prompts)
    by_provider = {group["provider"]: group for group in usage["by_provider"]}
    assert list(by_provider) == ["fal"] and by_provider["fal"]["predictions"] == len(prompts)
    events = [line.get("event") for line in worker.log_lines()]
    assert events.count("job.failover") == len(prompts)


async def test_with_fal_alone_the_walkthrough_makes_a_512_png_at_fal(make_stack: Any) -> None:
    with live_fake(FakeFalConfig(latency=0.2, seed=4)) as fal:
        stack = make_stack(MEDIAGEN_PROVIDERS="fal", MEDIAGEN_FAL_BASE_URL=fal.url)
        stack.start_worker()
        api_url = stack.start_api()
        async with httpx.AsyncClient(base_url=api_url, timeout=20) as api:
            job_id = await submit(api, "a ninja drinking coffee", width=512, height=512)
            status = await wait_for_job(api, job_id, timeout=30)
            view = (await api.get(f"/jobs/{job_id}")).json()
            image = await api.get(status["result_urls"][0])

    assert (status["status"], status["attempts"]) == ("succeeded", 1)
    [attempt] = view["attempt_history"]
    assert (attempt["provider"], attempt["failover_from"]) == ("fal", None)
    assert view["input"]["image_size"] == {"width": 512, "height": 512} and view["input"]["output_format"] == "png"
    assert image.headers["content-type"] == "image/png"
    [output] = view["outputs"]
    assert (output["width"], output["height"]) == (512, 512)
