"""The operator's command line reads the same story the API tells."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from conftest import submit, unique, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")


def mediagen(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mediagen.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_job_prints_each_attempt_with_its_error_and_the_wait(
    api: httpx.AsyncClient, service_env: dict[str, str]
) -> None:
    job_id = await submit(api, unique("told twice [[create:500*1]]"), width=64, height=64)
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
    job_id = await submit(api, unique("fails at first [[create:422*1]]"), width=64, height=64)
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
