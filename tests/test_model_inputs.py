"""Each model gets its own inputs, as the real Replicate takes them, and its outputs are stored as it gives them."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import FakeReplicate, Process, submit, unique, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")

SCHNELL = "black-forest-labs/flux-schnell"
PRO = "black-forest-labs/flux-1.1-pro"
SD35 = "stability-ai/stable-diffusion-3.5-large"
VIDEO = "fake/tiny-video"


async def finished(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    status = await wait_for_job(api, job_id)
    assert status["status"] == "succeeded", status
    job: dict[str, Any] = (await api.get(f"/jobs/{job_id}")).json()
    return job


def sent_to_replicate(fake_replicate: FakeReplicate, job: dict[str, Any]) -> dict[str, Any]:
    prediction_id = job["attempt_history"][-1]["prediction_id"]
    response = httpx.get(f"{fake_replicate.url}/v1/predictions/{prediction_id}", headers={"Authorization": "Bearer t"})
    sent: dict[str, Any] = response.json()["input"]
    return sent


async def picture(api: httpx.AsyncClient, url: str) -> tuple[str, tuple[int, int], str]:
    response = await api.get(url)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    return str(image.format), image.size, response.headers["content-type"]


async def test_models_lists_each_allowed_model_with_its_schema_defaults_output_and_price(
    api: httpx.AsyncClient,
) -> None:
    response = await api.get("/models")

    assert response.status_code == 200
    models = {m["model"]: m for m in response.json()["models"]}
    assert list(models) == [SCHNELL, "black-forest-labs/flux-dev", PRO, SD35]
    schnell = models[SCHNELL]
    assert schnell["default"] is True and schnell["price"] == {"usd": "0.003", "per": "image"}
    props = schnell["input_schema"]["properties"]
    assert list(props)[:3] == ["prompt", "aspect_ratio", "num_outputs"]  # x-order
    assert props["aspect_ratio"]["enum"][:2] == ["1:1", "16:9"] and "allOf" not in props["aspect_ratio"]
    assert schnell["defaults"]["output_format"] == "webp" and schnell["service_defaults"] == {"output_format": "png"}
    assert {"width": 512, "height": 512, "aspect_ratio": "1:1", "megapixels": "0.25"} in schnell["sizes"]
    assert schnell["output"] == {"kind": "image", "multiple": True}
    assert models[PRO]["output"] == {"kind": "image", "multiple": False} and models[PRO]["sizes"] == []
    assert "negative_prompt" in models[SD35]["input_schema"]["properties"]


async def test_512_on_flux_schnell_sends_aspect_ratio_and_megapixels_and_yields_a_512_webp(
    api: httpx.AsyncClient, fake_replicate: FakeReplicate
) -> None:
    job = await finished(api, await submit(api, unique("a harbour"), width=512, height=512, output_format="webp"))

    sent = sent_to_replicate(fake_replicate, job)
    assert sent == job["input"]
    assert (sent["aspect_ratio"], sent["megapixels"], sent["output_format"]) == ("1:1", "0.25", "webp")
    assert "width" not in sent and "height" not in sent
    [output] = job["outputs"]
    assert output["url"].endswith("/0.webp") and output["content_type"] == "image/webp"
    assert (output["width"], output["height"]) == (512, 512)
    assert await picture(api, output["url"]) == ("WEBP", (512, 512), "image/webp")


async def test_1000x300_on_flux_schnell_is_a_422_naming_the_sizes_it_makes(api: httpx.AsyncClient) -> None:
    response = await api.post("/generate", json={"prompt": "wide", "parameters": {"width": 1000, "height": 300}})

    assert response.status_code == 422
    [problem] = response.json()["detail"]["fields"]
    assert problem["field"] == "parameters.width"
    assert "1000x300" in problem["message"] and "1344x768" in problem["message"] and "512x512" in problem["message"]


async def test_an_unknown_key_is_a_422_naming_it_and_what_the_model_takes(api: httpx.AsyncClient) -> None:
    response = await api.post("/generate", json={"prompt": "typo", "parameters": {"aspect_ration": "1:1"}})

    assert response.status_code == 422
    [problem] = response.json()["detail"]["fields"]
    assert problem["field"] == "parameters.aspect_ration" and "aspect_ratio" in problem["message"]


async def test_a_custom_size_on_flux_11_pro_works_and_its_single_url_is_stored(
    api: httpx.AsyncClient, fake_replicate: FakeReplicate
) -> None:
    job_id = await submit(api, unique("a tall ship"), model=PRO, aspect_ratio="custom", width=640, height=480)

    job = await finished(api, job_id)

    assert sent_to_replicate(fake_replicate, job)["aspect_ratio"] == "custom"
    [output] = job["outputs"]
    assert (output["width"], output["height"], output["content_type"]) == (640, 480, "image/png")
    assert await picture(api, output["url"]) == ("PNG", (640, 480), "image/png")


async def test_sd35_gets_its_negative_prompt(api: httpx.AsyncClient, fake_replicate: FakeReplicate) -> None:
    job_id = await submit(api, unique("a meadow"), model=SD35, negative_prompt="fog", aspect_ratio="16:9")

    job = await finished(api, job_id)

    sent = sent_to_replicate(fake_replicate, job)
    assert (sent["negative_prompt"], sent["aspect_ratio"], sent["output_format"]) == ("fog", "16:9", "png")
    assert len(job["outputs"]) == 1 and job["outputs"][0]["width"] == 1344


async def test_images_flux_dropped_as_nsfw_leave_a_shorter_list_not_an_error(
    api: httpx.AsyncClient, worker: Process
) -> None:
    job = await finished(api, await submit(api, unique("a crowd [[nsfw:1]]"), num_outputs=3, megapixels="0.25"))

    assert [o["index"] for o in job["outputs"]] == [0, 1]
    assert len((await api.get(f"/status/{job['job_id']}")).json()["result_urls"]) == 2
    told = [line for line in worker.log_lines() if line.get("job_id") == job["job_id"]]
    assert {"event": "job.outputs.fewer", "asked": 3, "got": 2}.items() <= next(
        line for line in told if line["event"] == "job.outputs.fewer"
    ).items()


async def test_a_video_model_stores_an_mp4_served_with_range_requests(make_stack: Any) -> None:
    stack = make_stack(MEDIAGEN_ALLOWED_MODELS=f"{SCHNELL},{VIDEO}")
    url = stack.start_api()
    worker: Process = stack.start_worker()
    assert worker.proc.poll() is None
    async with httpx.AsyncClient(base_url=url, timeout=10) as api:
        listed = {m["model"]: m for m in (await api.get("/models")).json()["models"]}
        assert listed[VIDEO]["output"] == {"kind": "video", "multiple": False}
        assert listed[VIDEO]["schema_source"] == "replicate"

        job = await finished(api, await submit(api, unique("a short clip"), model=VIDEO))

        [output] = job["outputs"]
        assert output["url"].endswith("/0.mp4") and output["content_type"] == "video/mp4"
        whole = await api.get(output["url"])
        assert whole.headers["content-type"] == "video/mp4" and whole.content[4:8] == b"ftyp"
        assert whole.headers["accept-ranges"] == "bytes"
        part = await api.get(output["url"], headers={"Range": "bytes=0-99"})
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes 0-99/{len(whole.content)}"
        assert part.content == whole.content[:100]
