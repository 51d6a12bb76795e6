"""Bad input gets a clear 4xx, never a 500; the read routes answer what the job row says."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from conftest import submit, unique

# A fixed id keeps parametrised test ids the same in every test process (pytest-xdist compares them).
NO_SUCH_JOB = "3f0c6a2e-8d41-4c5b-9a7e-1b2c3d4e5f60"

DEV = "black-forest-labs/flux-dev"
PRO = "black-forest-labs/flux-1.1-pro"
SD35 = "stability-ai/stable-diffusion-3.5-large"


def fields_of(response: httpx.Response) -> list[str]:
    body = response.json()
    assert body["error"] == "validation_failed"
    assert body["detail"]["message"]
    return [item["field"] for item in body["detail"]["fields"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "ok", "colour": "red"}, "colour"),
        ({"prompt": "ok", "parameters": {"width": 100, "height": 512}}, "parameters.width"),
        ({"prompt": "ok", "parameters": {"width": 4096, "height": 4096}}, "parameters.width"),
        ({"prompt": "ok", "parameters": {"height": 32}}, "parameters.width"),
        ({"prompt": "ok", "parameters": {"width": "512"}}, "parameters.width"),
        ({"prompt": "ok", "parameters": {"num_outputs": 5}}, "parameters.num_outputs"),
        ({"prompt": "ok", "parameters": {"num_outputs": 0}}, "parameters.num_outputs"),
        ({"prompt": "ok", "parameters": {"seed": 1.5}}, "parameters.seed"),
        ({"prompt": "ok", "parameters": {"steps": 4}}, "parameters.steps"),
        ({"prompt": "ok", "parameters": {"model": "someone/unknown"}}, "parameters.model"),
        ({"prompt": "ok", "parameters": "wide"}, "parameters"),
        ({"prompt": "ok", "parameters": {"prompt": "again"}}, "parameters.prompt"),
        # per model: each one's own schema is the contract
        ({"prompt": "ok", "parameters": {"width": 1000, "height": 300}}, "parameters.width"),
        ({"prompt": "ok", "parameters": {"aspect_ratio": "7:5"}}, "parameters.aspect_ratio"),
        ({"prompt": "ok", "parameters": {"megapixels": 1}}, "parameters.megapixels"),
        ({"prompt": "ok", "parameters": {"num_inference_steps": 5}}, "parameters.num_inference_steps"),
        ({"prompt": "ok", "parameters": {"negative_prompt": "blur"}}, "parameters.negative_prompt"),
        ({"prompt": "ok", "parameters": {"output_format": "gif"}}, "parameters.output_format"),
        ({"prompt": "ok", "parameters": {"model": DEV, "guidance": 11}}, "parameters.guidance"),
        ({"prompt": "ok", "parameters": {"model": PRO, "num_outputs": 2}}, "parameters.num_outputs"),
        ({"prompt": "ok", "parameters": {"model": PRO, "width": 128, "height": 512}}, "parameters.width"),
        ({"prompt": "ok", "parameters": {"model": PRO, "width": 500, "height": 512}}, "parameters.width"),
        (
            {"prompt": "ok", "parameters": {"model": PRO, "aspect_ratio": "1:1", "width": 512}},
            "parameters.aspect_ratio",
        ),
        ({"prompt": "ok", "parameters": {"model": PRO, "megapixels": "1"}}, "parameters.megapixels"),
        ({"prompt": "ok", "parameters": {"model": SD35, "width": 512, "height": 512}}, "parameters.width"),
        ({"prompt": "ok", "parameters": {"model": SD35, "aspect_ratio": "4:3"}}, "parameters.aspect_ratio"),
        ({"prompt": "ok", "parameters": {"model": SD35, "cfg": 0.5}}, "parameters.cfg"),
        ({"prompt": "ok", "parameters": {"model": SD35, "negative_prompt": "a\x00b"}}, "parameters"),
    ],
)
async def test_bad_input_gets_a_422_naming_the_field(api: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    response = await api.post("/generate", json=body)

    assert response.status_code == 422
    assert field in fields_of(response)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"prompt": ', "line 1 column 12"),
        (b'{"prompt": "a cat",}', "line 1 column 20"),
        (b"{'prompt': 'a cat'}", "line 1 column 2"),
        (b'{"prompt": "a cat"} trailing', "Extra data"),
        (b'{"prompt": "\xff"}', "not UTF-8"),
        (b'{"prompt": "a cat", "prompt": "a dog"}', "'prompt' appears twice"),
        (b'{"prompt": "a cat", "parameters": {"width": 64, "width": 4096}}', "'width' appears twice"),
    ],
)
async def test_malformed_json_or_a_key_given_twice_gets_a_400_saying_where(
    api: httpx.AsyncClient, body: bytes, says: str
) -> None:
    response = await api.post("/generate", content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["error"] == "malformed_json"
    assert says in response.json()["detail"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"])
async def test_a_body_that_is_not_json_gets_a_415(api: httpx.AsyncClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await api.post("/generate", content=b'{"prompt": "a cat"}', headers=headers)

    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"


async def test_json_with_a_charset_is_json(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/generate",
        content=b'{"prompt": "a cat", "parameters": {"width": 512, "height": 512}}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )

    assert response.status_code == 202


async def test_well_formed_json_of_the_wrong_shape_is_still_a_422(api: httpx.AsyncClient) -> None:
    response = await api.post("/generate", content=b'["a cat"]', headers={"Content-Type": "application/json"})

    assert response.status_code == 422


async def test_an_oversized_body_gets_a_413(api: httpx.AsyncClient) -> None:
    response = await api.post("/generate", json={"prompt": "x" * 100_000})

    assert response.status_code == 413
    assert response.json()["error"] == "request_too_large"


async def test_a_streamed_oversized_body_gets_a_413(api: httpx.AsyncClient) -> None:
    async def chunks() -> Any:
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    response = await api.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})

    assert response.status_code == 413


async def test_a_rejected_submission_leaves_no_job_behind(api: httpx.AsyncClient, db: Any) -> None:
    from sqlalchemy import text

    prompt = unique("never stored")
    response = await api.post("/generate", json={"prompt": prompt, "parameters": {"width": 7}})

    assert response.status_code == 422
    async with db.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM jobs WHERE prompt = :p"), {"p": prompt})).scalar()
    assert count == 0


async def test_submit_answers_202_with_the_job_id_and_its_location(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/generate", json={"prompt": unique("a fox"), "parameters": {"width": 512, "height": 512}}
    )

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert response.headers["location"] == f"/status/{body['job_id']}"
    status = (await api.get(response.headers["location"])).json()
    assert status["job_id"] == body["job_id"] and status["status"] in ("queued", "running", "succeeded")


async def test_the_exact_input_sent_is_recorded_with_a_seed_chosen_when_absent(api: httpx.AsyncClient) -> None:
    prompt = unique("a seed")
    job_id = await submit(api, prompt, width=512, height=512)

    job = (await api.get(f"/jobs/{job_id}")).json()

    assert job["model"] == "black-forest-labs/flux-schnell"
    assert job["parameters"] == {"width": 512, "height": 512}
    seed = job["input"].pop("seed")
    assert isinstance(seed, int)
    assert job["input"] == {"prompt": prompt, "aspect_ratio": "1:1", "megapixels": "0.25", "output_format": "png"}


async def test_an_unknown_job_is_404_and_a_malformed_id_is_422(api: httpx.AsyncClient) -> None:
    for path in ("/status/{}", "/jobs/{}"):
        assert (await api.get(path.format(uuid.uuid4()))).status_code == 404
        assert (await api.get(path.format("not-a-uuid"))).status_code == 422


@pytest.mark.parametrize(
    "path",
    [
        "/media/../../etc/passwd",
        "/media/%2e%2e/%2e%2e/etc/passwd",
        "/media/..%2f..%2fetc%2fpasswd",
        f"/media/{NO_SUCH_JOB}/0.png",
        "/media/whatever.png",
    ],
)
async def test_media_never_serves_outside_its_folder(api: httpx.AsyncClient, path: str) -> None:
    response = await api.get(path)

    assert response.status_code == 404


async def test_jobs_are_listed_newest_first_across_pages(api: httpx.AsyncClient) -> None:
    ids = [await submit(api, unique(f"page {i}"), width=512, height=512) for i in range(5)]

    seen: list[str] = []
    cursor = None
    for _ in range(50):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/jobs", params=params)).json()
        seen += [item["job_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None or set(ids) <= set(seen):
            break

    positions = [seen.index(job_id) for job_id in ids]
    assert positions == sorted(positions, reverse=True)
    assert len(seen) == len(set(seen))


async def test_jobs_can_be_filtered_by_status(api: httpx.AsyncClient) -> None:
    page = (await api.get("/jobs", params={"status": "failed", "limit": 200})).json()

    assert all(item["status"] == "failed" for item in page["items"])
    assert (await api.get("/jobs", params={"status": "lost"})).status_code == 422
    assert (await api.get("/jobs", params={"cursor": "garbage!"})).status_code == 422
    assert (await api.get("/jobs", params={"limit": 0})).status_code == 422


async def test_health_and_readiness(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    ready = await api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


async def test_the_openapi_document_describes_the_routes(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()

    assert {"/generate", "/status/{job_id}", "/jobs/{job_id}", "/jobs", "/healthz", "/readyz"} <= set(schema["paths"])
