"""Idempotent submits, cancel, and API keys."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import FakeReplicate, Process, start_api, stop, submit, unique, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")


async def test_the_same_idempotency_key_and_body_return_the_original_job(api: httpx.AsyncClient) -> None:
    key = str(uuid.uuid4())
    body = {"prompt": unique("idempotent"), "parameters": {"width": 512, "height": 512}}

    first = await api.post("/generate", json=body, headers={"Idempotency-Key": key})
    second = await api.post("/generate", json=body, headers={"Idempotency-Key": key})

    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["job_id"] == second.json()["job_id"]
    assert second.headers["location"] == first.headers["location"]


async def test_the_same_idempotency_key_with_another_body_is_a_conflict(api: httpx.AsyncClient) -> None:
    key = str(uuid.uuid4())
    await api.post("/generate", json={"prompt": unique("one")}, headers={"Idempotency-Key": key})

    response = await api.post("/generate", json={"prompt": unique("two")}, headers={"Idempotency-Key": key})

    assert response.status_code == 409
    assert "Idempotency-Key" in response.json()["detail"]


async def test_concurrent_submits_with_one_key_make_one_job(api: httpx.AsyncClient, db: Any) -> None:
    import asyncio

    from sqlalchemy import text

    key = str(uuid.uuid4())
    body = {"prompt": unique("racing"), "parameters": {"width": 512, "height": 512}}
    responses = await asyncio.gather(
        *(api.post("/generate", json=body, headers={"Idempotency-Key": key}) for _ in range(8))
    )

    assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
    assert len({r.json()["job_id"] for r in responses}) == 1
    async with db.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM jobs WHERE idempotency_key = :k"), {"k": key})).scalar()
    assert count == 1


async def test_canceling_a_running_job_cancels_its_prediction(
    api: httpx.AsyncClient, fake_replicate: FakeReplicate
) -> None:
    prompt = unique("a very long render [[latency=30]]")
    job_id = await submit(api, prompt, width=512, height=512)
    await wait_for_job(api, job_id, until=("running",))

    response = await api.post(f"/jobs/{job_id}/cancel")

    assert response.status_code in (200, 202)
    status = await wait_for_job(api, job_id, timeout=10)
    assert status["status"] == "canceled"
    [attempt] = (await api.get(f"/jobs/{job_id}")).json()["attempt_history"]
    assert attempt["outcome"] == "canceled" and attempt["prediction_id"]
    assert fake_replicate.stats()["statuses"].get("canceled", 0) >= 1
    prediction = httpx.get(
        f"{fake_replicate.url}/v1/predictions/{attempt['prediction_id']}", headers={"Authorization": "Bearer t"}
    ).json()
    assert prediction["status"] == "canceled"


async def test_a_job_canceled_while_it_waits_never_runs(api: httpx.AsyncClient, fake_replicate: FakeReplicate) -> None:
    # A 429 keeps the job waiting (throttled, in its first attempt) while we cancel it. Not longer: a 429
    # pauses the whole account's create budget, so every other test's creates wait as long.
    prompt = unique("never mind [[create:429*1:retry_after=4]]")
    job_id = await submit(api, prompt, width=512, height=512)
    await wait_for_job(api, job_id, until=("running",))

    response = await api.post(f"/jobs/{job_id}/cancel")

    assert response.status_code in (200, 202)
    assert (await wait_for_job(api, job_id, timeout=10))["status"] == "canceled"
    assert fake_replicate.predictions_for(prompt) == 0


async def test_canceling_a_finished_job_is_a_conflict(api: httpx.AsyncClient) -> None:
    job_id = await submit(api, unique("done quickly"), width=512, height=512)
    await wait_for_job(api, job_id)

    response = await api.post(f"/jobs/{job_id}/cancel")

    assert response.status_code == 409
    assert (await api.post(f"/jobs/{uuid.uuid4()}/cancel")).status_code == 404


KEYS = ("key-alice-0123456789", "key-bob-9876543210")


@pytest.fixture(scope="module")
def keyed_api(service_env: dict[str, str], workdir: Path) -> Iterator[Process]:
    process = start_api(service_env, workdir / "api-keyed.log", MEDIAGEN_API_KEYS=",".join(KEYS))
    yield process
    stop(process.proc)


@pytest.fixture
async def alice(keyed_api: Process) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    async with httpx.AsyncClient(base_url=keyed_api.extra["url"], headers=headers, timeout=10) as client:
        yield client


@pytest.fixture
async def bob(keyed_api: Process) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {KEYS[1]}"}
    async with httpx.AsyncClient(base_url=keyed_api.extra["url"], headers=headers, timeout=10) as client:
        yield client


async def test_with_api_keys_every_route_but_health_needs_one(keyed_api: Process) -> None:
    async with httpx.AsyncClient(base_url=keyed_api.extra["url"]) as anonymous:
        assert (await anonymous.get("/healthz")).status_code == 200
        for method, path in [("POST", "/generate"), ("GET", f"/status/{uuid.uuid4()}"), ("GET", "/jobs")]:
            response = await anonymous.request(method, path, json={"prompt": "x"})
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = await anonymous.get("/jobs", headers={"Authorization": "Bearer not-a-key"})
        assert wrong.status_code == 401


async def test_with_api_keys_metrics_need_a_key_too(keyed_api: Process, alice: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=keyed_api.extra["url"]) as anonymous:
        refused = await anonymous.get("/metrics")

    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    scraped = await alice.get("/metrics")
    assert scraped.status_code == 200 and "mediagen_http_requests_total" in scraped.text


async def test_a_job_is_visible_only_to_the_key_that_made_it(alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    job_id = await submit(alice, unique("alice's secret garden"), width=512, height=512)
    status = await wait_for_job(alice, job_id)

    assert (await bob.get(f"/status/{job_id}")).status_code == 404
    assert (await bob.get(f"/jobs/{job_id}")).status_code == 404
    assert (await bob.post(f"/jobs/{job_id}/cancel")).status_code == 404
    assert job_id not in [item["job_id"] for item in (await bob.get("/jobs")).json()["items"]]
    assert job_id in [item["job_id"] for item in (await alice.get("/jobs")).json()["items"]]
    assert (await bob.get(status["result_urls"][0])).status_code == 404
    assert (await alice.get(status["result_urls"][0])).status_code == 200


async def test_with_api_keys_an_output_may_be_cached_by_its_owner_only(alice: httpx.AsyncClient) -> None:
    job_id = await submit(alice, unique("a private lighthouse"), width=512, height=512)
    status = await wait_for_job(alice, job_id)

    image = await alice.get(status["result_urls"][0])

    assert image.status_code == 200
    assert image.headers["cache-control"] == "private, max-age=31536000, immutable"


async def test_idempotency_keys_are_scoped_per_api_key(alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    key = str(uuid.uuid4())
    body = {"prompt": unique("shared key"), "parameters": {"width": 512, "height": 512}}

    first = await alice.post("/generate", json=body, headers={"Idempotency-Key": key})
    second = await bob.post("/generate", json=body, headers={"Idempotency-Key": key})

    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] != second.json()["job_id"]


def test_without_api_keys_the_startup_log_says_so(api_url: str, workdir: Path) -> None:
    text = (workdir / "api.log").read_text()
    assert "no API key (MEDIAGEN_API_KEYS, mediagen keys create), every caller sees every job" in text
