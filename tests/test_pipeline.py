"""The core promise, end to end: a prompt becomes a stored image, with every attempt on record.

Real API and worker processes, real PostgreSQL and Redis, the fake Replicate over HTTP. Faults are
asked for per prompt with the fake's `[[...]]` directives, so tests do not disturb one another.
"""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import text

from conftest import FakeReplicate, Process, submit, unique, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")


async def job_view(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await api.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_prompt_becomes_a_stored_png(api: httpx.AsyncClient, fake_replicate: FakeReplicate) -> None:
    prompt = unique("a ninja drinking coffee")
    job_id = await submit(api, prompt, width=576, height=448)  # flux-schnell at 4:3, 0.25 megapixels

    status = await wait_for_job(api, job_id)

    assert status["status"] == "succeeded" and status["attempts"] == 1 and status["error"] is None
    [url] = status["result_urls"]
    image = await api.get(url)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert "immutable" in image.headers["cache-control"]
    assert Image.open(io.BytesIO(image.content)).size == (576, 448)
    job = await job_view(api, job_id)
    [output] = job["outputs"]
    assert (output["width"], output["height"]) == (576, 448)
    assert output["sha256"] == hashlib.sha256(image.content).hexdigest()
    assert output["size_bytes"] == len(image.content)
    assert job["attempt_history"][0]["outcome"] == "succeeded"
    assert job["attempt_history"][0]["prediction_id"]
    assert fake_replicate.predictions_for(prompt) == 1


async def test_several_outputs_are_all_stored(api: httpx.AsyncClient) -> None:
    job_id = await submit(api, unique("three cats"), width=512, height=512, num_outputs=3)

    status = await wait_for_job(api, job_id)

    assert status["status"] == "succeeded"
    assert [url.rsplit("/", 1)[1] for url in status["result_urls"]] == ["0.png", "1.png", "2.png"]
    for url in status["result_urls"]:
        assert (await api.get(url)).content.startswith(b"\x89PNG")


async def test_a_500_on_create_then_success_takes_two_attempts(
    api: httpx.AsyncClient, fake_replicate: FakeReplicate, worker: Process, db: Any
) -> None:
    prompt = unique("a lighthouse [[create:500*1]]")
    job_id = await submit(api, prompt, width=512, height=512)

    status = await wait_for_job(api, job_id)

    assert status["status"] == "succeeded" and status["attempts"] == 2
    first, second = (await job_view(api, job_id))["attempt_history"]
    assert (first["outcome"], first["http_status"], first["prediction_id"]) == ("failed", 500, None)
    assert 0.1 <= first["retry_delay_seconds"] <= 1.0
    assert second["outcome"] == "succeeded"
    assert fake_replicate.predictions_for(prompt) == 1
    events = [line for line in worker.log_lines() if line.get("job_id") == job_id]
    names = [line["event"] for line in events]
    assert names.count("job.attempt.started") == 2
    assert "job.attempt.failed" in names and "job.attempt.succeeded" in names
    [scheduled] = [line for line in events if line["event"] == "job.retry.scheduled"]
    assert scheduled["delay_seconds"] == first["retry_delay_seconds"]
    assert all("attempt" in line for line in events if line["event"].startswith("job.attempt"))
    # A 500 does not prove that no prediction was made: the next attempt looked for it before creating
    # (this fake made none, so there was nothing to adopt).
    async with db.connect() as conn:
        sent = (
            await conn.execute(
                text("SELECT create_sent_at FROM attempts WHERE job_id = :id AND number = 1"), {"id": job_id}
            )
        ).scalar()
    assert sent is not None
    assert not any(line["event"] == "job.prediction.adopted" for line in events)


@pytest.mark.parametrize("answer", ["504", "drop"])
async def test_a_create_that_made_its_prediction_but_answered_504_is_paid_for_once(
    api: httpx.AsyncClient, fake_replicate: FakeReplicate, answer: str
) -> None:
    prompt = unique(f"a gateway gave up [[create_ambiguous:{answer}*1]]")
    job_id = await submit(api, prompt, width=512, height=512)

    status = await wait_for_job(api, job_id)

    assert status["status"] == "succeeded" and status["attempts"] == 2
    first, second = (await job_view(api, job_id))["attempt_history"]
    assert (first["outcome"], first["prediction_id"]) == ("failed", None)
    assert second["prediction_id"] is not None and second["outcome"] == "succeeded"
    assert fake_replicate.predictions_for(prompt) == 1  # adopted, not made again


async def test_a_429_is_no_failed_attempt_the_job_waits_its_retry_after(
    api: httpx.AsyncClient, fake_replicate: FakeReplicate
) -> None:
    prompt = unique("a slow river [[create:429*1:retry_after=2]]")
    job_id = await submit(api, prompt, width=512, height=512)

    status = await wait_for_job(api, job_id)

    assert status["status"] == "succeeded" and status["attempts"] == 1
    [only] = (await job_view(api, job_id))["attempt_history"]
    assert only["outcome"] == "succeeded" and only["http_status"] is None
    assert _parse(only["finished_at"]) - _parse(only["started_at"]) >= timedelta(seconds=2)
    assert fake_replicate.predictions_for(prompt) == 1


async def test_a_flagged_prompt_fails_after_one_attempt_with_the_models_message(
    api: httpx.AsyncClient, fake_replicate: FakeReplicate
) -> None:
    prompt = unique("something forbidden [[flagged]]")
    job_id = await submit(api, prompt, width=512, height=512)

    status = await wait_for_job(api, job_id)

    assert status["status"] == "failed" and status["attempts"] == 1
    assert "flagged as sensitive" in status["error"] and "E005" in status["error"]
    assert fake_replicate.predictions_for(prompt) == 1


async def test_invalid_input_at_the_provider_fails_at_once(api: httpx.AsyncClient) -> None:
    job_id = await submit(api, unique("a bad input [[invalid]]"), width=512, height=512)

    status = await wait_for_job(api, job_id)

    assert status["status"] == "failed" and status["attempts"] == 1
    [attempt] = (await job_view(api, job_id))["attempt_history"]
    assert attempt["http_status"] == 422 and attempt["retry_delay_seconds"] is None


async def test_exhausted_retries_fail_with_the_last_error(api: httpx.AsyncClient, worker: Process) -> None:
    job_id = await submit(api, unique("always down [[create:503*99]]"), width=512, height=512)

    status = await wait_for_job(api, job_id)

    assert status["status"] == "failed" and status["attempts"] == 3  # MEDIAGEN_MAX_ATTEMPTS in tests
    assert "503" in (await job_view(api, job_id))["error_class"]
    attempts = (await job_view(api, job_id))["attempt_history"]
    assert [a["http_status"] for a in attempts] == [503, 503, 503]
    assert attempts[-1]["retry_delay_seconds"] is None
    events = [line["event"] for line in worker.log_lines() if line.get("job_id") == job_id]
    assert events.count("job.retry.scheduled") == 2 and events[-1] == "job.failed"


async def test_a_failed_prediction_is_replaced_by_a_new_one(
    api: httpx.AsyncClient, fake_replicate: FakeReplicate
) -> None:
    prompt = unique("a cold start [[fail*1]]")
    job_id = await submit(api, prompt, width=512, height=512)

    status = await wait_for_job(api, job_id)

    assert status["status"] == "succeeded" and status["attempts"] == 2
    first, second = (await job_view(api, job_id))["attempt_history"]
    assert first["prediction_id"] != second["prediction_id"]
    assert fake_replicate.predictions_for(prompt) == 2


async def test_an_output_that_is_not_an_image_is_rejected(api: httpx.AsyncClient) -> None:
    job_id = await submit(api, unique("a web page [[output:notimage]]"), width=512, height=512)

    status = await wait_for_job(api, job_id)

    assert status["status"] == "failed" and status["attempts"] == 1
    assert "not an image" in status["error"]


async def test_a_missing_output_file_is_retried_on_the_same_prediction(
    api: httpx.AsyncClient, fake_replicate: FakeReplicate
) -> None:
    prompt = unique("gone [[output:404]]")
    job_id = await submit(api, prompt, width=512, height=512)

    status = await wait_for_job(api, job_id)

    assert status["status"] == "failed" and status["attempts"] == 3
    attempts = (await job_view(api, job_id))["attempt_history"]
    assert len({a["prediction_id"] for a in attempts}) == 1
    assert [a["resumed"] for a in attempts] == [False, True, True]
    assert fake_replicate.predictions_for(prompt) == 1


def _parse(value: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value)
