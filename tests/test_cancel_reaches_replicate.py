"""Cancel always reaches the prediction, through the whole stack and the fake Replicate: a job canceled
while its worker waits out an outage ends at once, and its prediction is canceled at Replicate as soon
as Replicate takes calls again (before that, it could not be; it would otherwise run, and be billed,
until the job's deadline ends it)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from conftest import private_fake, submit, unique, wait_for_job

AUTH = {"Authorization": "Bearer test"}


async def test_a_job_canceled_during_an_outage_has_its_prediction_canceled_once_replicate_is_back(
    make_stack: Any, workdir: Any
) -> None:
    with private_fake(workdir, "cancel-outage-fake", latency=30.0) as fake:
        stack = make_stack(
            REPLICATE_BASE_URL=fake.url,
            MEDIAGEN_REPLICATE_CIRCUIT_FAILURES="3",
            MEDIAGEN_REPLICATE_CIRCUIT_OPEN_SECONDS="1",
            MEDIAGEN_RETRY_BASE_SECONDS="0.2",
        )
        worker = stack.start_worker()
        api_url = stack.start_api()
        async with httpx.AsyncClient(base_url=api_url, timeout=20) as api:
            job_id = await submit(api, unique("a long exposure"), width=512, height=512)
            prediction_id = await _prediction_of(api, job_id)
            httpx.post(f"{fake.url}/_fake/outage", json={"seconds": 4}).raise_for_status()
            await _until(api, job_id, lambda body: body.get("waiting_for") == "provider")

            canceled_at = time.monotonic()
            assert (await api.post(f"/jobs/{job_id}/cancel")).status_code in (200, 202)
            final = await wait_for_job(api, job_id, timeout=10)
            ended_after = time.monotonic() - canceled_at

        assert final["status"] == "canceled" and ended_after < 3.5  # the job's end waits for no outage
        status = _status_at_replicate(fake.url, prediction_id, within=15)
        assert status == "canceled"
        events = [line for line in worker.log_lines() if line.get("prediction_id") == prediction_id]
        assert any(line["event"] == "job.prediction.cancel_failed" and line["retrying"] for line in events)
        assert any(line["event"] == "job.prediction.canceled" and line.get("late") for line in events)


async def _prediction_of(api: httpx.AsyncClient, job_id: str, timeout: float = 15.0) -> str:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        attempts = (await api.get(f"/jobs/{job_id}")).json().get("attempt_history") or []
        if attempts and attempts[-1].get("prediction_id"):
            return str(attempts[-1]["prediction_id"])
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} never started a prediction")


async def _until(api: httpx.AsyncClient, job_id: str, check: Any, timeout: float = 20.0) -> None:
    give_up = time.monotonic() + timeout
    while not check(body := (await api.get(f"/status/{job_id}")).json()):
        assert time.monotonic() < give_up, f"not reached within {timeout} s: {body}"
        await asyncio.sleep(0.1)


def _status_at_replicate(url: str, prediction_id: str, *, within: float) -> str:
    """The prediction's status at the fake once it is final (or the last one seen after `within` s)."""
    give_up = time.monotonic() + within
    status = "unknown"
    while time.monotonic() < give_up:
        response = httpx.get(f"{url}/v1/predictions/{prediction_id}", headers=AUTH)
        if response.status_code == 200:
            status = response.json()["status"]
            if status in ("succeeded", "failed", "canceled", "aborted"):
                return status
        time.sleep(0.2)
    return status
