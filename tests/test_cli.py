"""The operator's command line reads the same story the API tells."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import text

from conftest import FakeReplicate, submit, unique, wait_for_job
from mediagen.core.db import Database
from mediagen.devtools.embedded import free_port

pytestmark = pytest.mark.usefixtures("worker")


def mediagen(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mediagen.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_job_prints_each_attempt_with_its_error_and_the_wait(
    api: httpx.AsyncClient, service_env: dict[str, str]
) -> None:
    job_id = await submit(api, unique("told twice [[create:500*1]]"), width=512, height=512)
    await wait_for_job(api, job_id)

    result = mediagen(service_env, "job", job_id)

    assert result.returncode == 0, result.stderr
    assert f"job {job_id}  SUCCEEDED" in result.stdout
    assert "#1 " in result.stdout and "failed" in result.stdout and "HTTP 500" in result.stdout
    assert "then waited" in result.stdout
    assert "#2 " in result.stdout and "succeeded" in result.stdout


async def test_jobs_lists_failed_ones_and_retry_runs_one_again(
    api: httpx.AsyncClient, service_env: dict[str, str]
) -> None:
    job_id = await submit(api, unique("fails at first [[create:422*1]]"), width=512, height=512)
    assert (await wait_for_job(api, job_id))["status"] == "failed"

    listed = mediagen(service_env, "jobs", "--status", "failed", "--since", "1h", "--limit", "500")
    assert listed.returncode == 0 and job_id in listed.stdout

    retried = mediagen(service_env, "retry", job_id)
    assert retried.returncode == 0, retried.stderr
    status = await wait_for_job(api, job_id)
    assert status["status"] == "succeeded" and status["attempts"] == 2

    again = mediagen(service_env, "retry", job_id)
    assert again.returncode == 1 and "not failed" in again.stderr


def test_an_unknown_job_is_an_error(service_env: dict[str, str]) -> None:
    result = mediagen(service_env, "job", "00000000-0000-0000-0000-000000000000")
    assert result.returncode == 1 and "no job" in result.stderr


async def failed_job_holding(db: Database, api: httpx.AsyncClient, prompt: str, prediction: Callable[[], str]) -> str:
    """A failed job whose last attempt holds `prediction()`, not failed itself (the state in which
    a retry used to resume the old prediction)."""
    job_id = await submit(api, prompt, width=512, height=512)
    assert (await wait_for_job(api, job_id))["status"] == "failed"
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE attempts SET prediction_id = :p, prediction_status = 'succeeded' WHERE job_id = :id"),
            {"p": prediction(), "id": job_id},
        )
    return job_id


async def test_retry_starts_a_fresh_prediction_instead_of_resuming_the_old_one(
    api: httpx.AsyncClient, service_env: dict[str, str], db: Database, fake_replicate: FakeReplicate
) -> None:
    prompt = unique("retried by hand [[create:422*1]]")

    def existing_prediction() -> str:
        made: str = httpx.post(
            f"{fake_replicate.url}/v1/models/black-forest-labs/flux-schnell/predictions",
            json={"input": {"prompt": prompt, "megapixels": "0.25"}},
            headers={"Authorization": "Bearer test"},
        ).json()["id"]
        return made

    job_id = await failed_job_holding(db, api, prompt, existing_prediction)
    old = (await api.get(f"/jobs/{job_id}")).json()["attempt_history"][-1]["prediction_id"]
    assert fake_replicate.predictions_for(prompt) == 1 and old

    retried = mediagen(service_env, "retry", job_id)

    assert retried.returncode == 0, retried.stderr
    assert "fresh prediction" in retried.stdout
    assert (await wait_for_job(api, job_id))["status"] == "succeeded"
    detail = (await api.get(f"/jobs/{job_id}")).json()
    last = detail["attempt_history"][-1]
    assert last["outcome"] == "succeeded" and not last["resumed"]
    assert last["prediction_id"] not in (None, old)
    assert fake_replicate.predictions_for(prompt) == 2


async def failed_job_left_running(db: Database, api: httpx.AsyncClient, prompt: str, prediction: str) -> str:
    """A failed job whose last attempt holds `prediction`, last seen `processing`: it may still run."""
    job_id = await failed_job_holding(db, api, prompt, lambda: prediction)
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE attempts SET prediction_status = 'processing' WHERE job_id = :id"), {"id": job_id}
        )
    return job_id


async def test_retry_cancels_an_earlier_prediction_that_may_still_run_before_a_fresh_one(
    api: httpx.AsyncClient, service_env: dict[str, str], db: Database, fake_replicate: FakeReplicate
) -> None:
    slow = httpx.post(
        f"{fake_replicate.url}/v1/models/black-forest-labs/flux-schnell/predictions",
        json={"input": {"prompt": unique("still running [[latency=60]]"), "megapixels": "0.25"}},
        headers={"Authorization": "Bearer test"},
    ).json()["id"]
    job_id = await failed_job_left_running(db, api, unique("retried while running [[create:422*1]]"), slow)

    retried = mediagen(service_env, "retry", job_id)

    assert retried.returncode == 0, retried.stderr
    assert f"canceled the earlier prediction {slow}" in retried.stdout
    earlier = httpx.get(f"{fake_replicate.url}/v1/predictions/{slow}", headers={"Authorization": "Bearer t"}).json()
    assert earlier["status"] == "canceled"
    assert (await wait_for_job(api, job_id))["status"] == "succeeded"
    async with db.connect() as conn:
        noted = (
            await conn.execute(text("SELECT prediction_status FROM attempts WHERE prediction_id = :p"), {"p": slow})
        ).scalar()
    assert noted == "canceled"


async def test_retry_is_refused_while_an_earlier_prediction_cannot_be_canceled(
    api: httpx.AsyncClient, service_env: dict[str, str], db: Database
) -> None:
    job_id = await failed_job_left_running(db, api, unique("provider away [[create:422*1]]"), "p-unreachable")
    away = {**service_env, "REPLICATE_BASE_URL": f"http://127.0.0.1:{free_port()}"}

    retried = mediagen(away, "retry", job_id)

    assert retried.returncode == 1
    assert "p-unreachable" in retried.stderr and "not retried" in retried.stderr
    assert (await api.get(f"/status/{job_id}")).json()["status"] == "failed"


async def test_retry_prints_the_real_redis_error_and_the_sweep_still_runs_the_job(
    api: httpx.AsyncClient, service_env: dict[str, str], db: Database
) -> None:
    job_id = await failed_job_holding(db, api, unique("redis refused [[create:422*1]]"), lambda: "gone-before-retry")

    retried = mediagen({**service_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, "retry", job_id)

    assert retried.returncode == 0, retried.stderr
    assert "ConnectionError" in retried.stderr and "Redis not reachable" not in retried.stderr
    assert (await wait_for_job(api, job_id))["status"] == "succeeded"


def test_retry_help_says_what_may_be_retried(service_env: dict[str, str]) -> None:
    result = mediagen(service_env, "retry", "--help")
    assert result.returncode == 0
    text_ = " ".join(result.stdout.split())
    assert "failed or canceled" in text_ and "failed at Replicate" in text_ and "fresh prediction" in text_
