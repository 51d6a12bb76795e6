"""The fake Replicate runs each model as Replicate does, pinned to shared/replicate-models.md."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image
from replicate.prediction import Prediction

from fake_replicate.config import FakeConfig
from fake_replicate.server import create_app

Progress = Prediction.Progress
SCHNELL = "black-forest-labs/flux-schnell"
DEV = "black-forest-labs/flux-dev"
PRO = "black-forest-labs/flux-1.1-pro"
SD35 = "stability-ai/stable-diffusion-3.5-large"
VIDEO = "fake/tiny-video"
AUTH = {"Authorization": "Bearer test"}


@pytest.fixture
async def fake() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(FakeConfig(latency=0.0, seed=3))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake", headers=AUTH) as c:
        yield c


def unique(text: str = "a lighthouse") -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


async def run(fake: httpx.AsyncClient, model: str, **inputs: Any) -> dict[str, Any]:
    response = await fake.post(f"/v1/models/{model}/predictions", json={"input": {"prompt": unique(), **inputs}})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def image(fake: httpx.AsyncClient, url: str) -> tuple[str, tuple[int, int], str]:
    response = await fake.get(url)
    assert response.status_code == 200
    picture = Image.open(io.BytesIO(response.content))
    picture.load()
    return str(picture.format), picture.size, response.headers["content-type"]


async def test_each_model_serves_its_own_cog_schema_with_enums_behind_refs(fake: httpx.AsyncClient) -> None:
    body = (await fake.get(f"/v1/models/{SCHNELL}")).json()
    latest = body["latest_version"]
    assert latest["id"] == "c846a69991daf4c0e5d016514849d14ee5b2e6846ce6b9d6f21369e564cfe51e"
    schemas = latest["openapi_schema"]["components"]["schemas"]
    props = schemas["Input"]["properties"]
    assert schemas["Input"]["required"] == ["prompt"]
    assert props["aspect_ratio"]["allOf"] == [{"$ref": "#/components/schemas/aspect_ratio"}]
    assert schemas["aspect_ratio"]["enum"][:3] == ["1:1", "16:9", "21:9"] and len(schemas["aspect_ratio"]["enum"]) == 11
    assert schemas["megapixels"]["enum"] == ["1", "0.25"]
    assert props["num_inference_steps"]["maximum"] == 4 and "width" not in props
    assert schemas["Output"]["type"] == "array"
    pro = (await fake.get(f"/v1/models/{PRO}")).json()["latest_version"]["openapi_schema"]["components"]["schemas"]
    assert pro["Output"] == {"type": "string", "format": "uri", "title": "Output"}
    assert "num_outputs" not in pro["Input"]["properties"] and pro["Input"]["properties"]["width"]["maximum"] == 1440
    sd = (await fake.get(f"/v1/models/{SD35}")).json()["latest_version"]["openapi_schema"]["components"]["schemas"]
    assert "negative_prompt" in sd["Input"]["properties"] and "3:4" not in sd["aspect_ratio"]["enum"]


async def test_out_of_range_is_a_422_with_replicates_own_words(fake: httpx.AsyncClient) -> None:
    response = await fake.post(
        f"/v1/models/{SCHNELL}/predictions", json={"input": {"prompt": "x", "num_inference_steps": 5}}
    )
    assert response.status_code == 422
    body = response.json()
    assert body["title"] == "Input validation failed"
    assert body["detail"] == "- input.num_inference_steps: Must be less than or equal to 4\n"
    assert body["invalid_fields"] == [
        {"type": "number_lte", "field": "input.num_inference_steps", "description": "Must be less than or equal to 4"}
    ]


async def test_a_bad_enum_and_a_missing_prompt_are_named_like_replicate_names_them(fake: httpx.AsyncClient) -> None:
    response = await fake.post(f"/v1/models/{SCHNELL}/predictions", json={"input": {"output_format": "gif"}})
    assert response.status_code == 422
    assert response.json()["invalid_fields"] == [
        {"type": "required", "field": "input", "description": "prompt is required"},
        {
            "type": "enum",
            "field": "input.output_format",
            "description": 'output_format must be one of the following: "webp", "jpg", "png"',
        },
    ]


async def test_flux_schnell_ignores_width_and_makes_a_1024_webp_list_by_default(fake: httpx.AsyncClient) -> None:
    body = await run(fake, SCHNELL, width=512, height=512)
    assert body["status"] == "succeeded" and isinstance(body["output"], list) and len(body["output"]) == 1
    assert body["output"][0].endswith("/out-0.webp")
    assert await image(fake, body["output"][0]) == ("WEBP", (1024, 1024), "image/webp")


async def test_aspect_ratio_and_megapixels_make_the_real_sizes(fake: httpx.AsyncClient) -> None:
    quarter = await run(fake, SCHNELL, aspect_ratio="1:1", megapixels="0.25", output_format="png", num_outputs=2)
    assert len(quarter["output"]) == 2
    assert await image(fake, quarter["output"][1]) == ("PNG", (512, 512), "image/png")
    wide = await run(fake, DEV, aspect_ratio="16:9", output_format="jpg")
    assert await image(fake, wide["output"][0]) == ("JPEG", (1344, 768), "image/jpeg")


async def test_flux_11_pro_answers_one_url_and_rounds_custom_sizes_to_32(fake: httpx.AsyncClient) -> None:
    exact = await run(fake, PRO, aspect_ratio="custom", width=640, height=480, output_format="png")
    assert isinstance(exact["output"], str)
    assert await image(fake, exact["output"]) == ("PNG", (640, 480), "image/png")
    rounded = await run(fake, PRO, aspect_ratio="custom", width=500, height=300)
    assert (await image(fake, rounded["output"]))[:2] == ("WEBP", (512, 288))


async def test_sd35_answers_one_url_and_keeps_the_negative_prompt(fake: httpx.AsyncClient) -> None:
    body = await run(fake, SD35, negative_prompt="blurry", num_outputs=3)  # num_outputs: not an input, ignored
    assert isinstance(body["output"], str) and body["input"]["negative_prompt"] == "blurry"
    assert (await image(fake, body["output"]))[0] == "WEBP"


async def test_flux_writes_tqdm_progress_the_client_parses_and_the_proxies_do_not(fake: httpx.AsyncClient) -> None:
    flux = await run(fake, SCHNELL)
    progress = Progress.parse(flux["logs"])
    assert progress is not None and (progress.percentage, progress.current, progress.total) == (1.0, 4, 4)
    assert "Total safe images: 1 out of 1" in flux["logs"]
    assert Progress.parse((await run(fake, SD35))["logs"]) is None
    assert flux["metrics"]["image_count"] == 1


async def test_an_nsfw_flag_drops_that_image_and_all_flagged_fails(fake: httpx.AsyncClient) -> None:
    one = await run(fake, SCHNELL, prompt=unique("[[nsfw:1]]"), num_outputs=3)
    assert one["status"] == "succeeded" and len(one["output"]) == 2
    assert "Total safe images: 2 out of 3" in one["logs"] and one["metrics"]["image_count"] == 2
    assert (await fake.get(one["output"][1])).status_code == 200
    assert (await fake.get(one["output"][1].replace("out-1", "out-2"))).status_code == 404
    everything = await run(fake, DEV, prompt=unique("[[nsfw:1]]"))
    assert everything["status"] == "failed" and everything["error"].startswith("All generated images contained NSFW")


async def test_the_video_model_makes_one_real_mp4(fake: httpx.AsyncClient) -> None:
    body = await run(fake, VIDEO)
    assert isinstance(body["output"], str) and body["output"].endswith(".mp4")
    response = await fake.get(body["output"])
    assert response.headers["content-type"] == "video/mp4"
    assert response.content[4:8] == b"ftyp" and b"moov" in response.content and b"mdat" in response.content


async def test_an_unknown_key_beside_input_is_refused_as_replicate_refuses_it(fake: httpx.AsyncClient) -> None:
    response = await fake.post(f"/v1/models/{SCHNELL}/predictions", json={"input": {"prompt": "x"}, "model": SCHNELL})

    assert response.status_code == 422
    body = response.json()
    assert body["detail"] == "- Additional property model is not allowed\n"
    assert body["invalid_fields"] == [
        {
            "type": "additional_property_not_allowed",
            "field": "",
            "description": "Additional property model is not allowed",
        }
    ]
