"""Outputs come only from hosts we trust, within size; secrets never leak into logs or answers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Stack, stop, submit, unique, wait_for_job, wait_http
from mediagen.devtools.embedded import free_port


@pytest.fixture
def lying_fake(workdir: Path) -> Iterator[str]:
    """A fake Replicate whose output URLs name another host (`localhost`) than the API's (`127.0.0.1`)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fake_replicate",
            "--port",
            str(port),
            "--latency",
            "0.1",
            "--base-url",
            f"http://localhost:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/_fake/health", proc)
    yield url
    stop(proc)


async def test_outputs_from_a_host_we_do_not_trust_fail_the_job(make_stack: Any, lying_fake: str) -> None:
    stack: Stack = make_stack(REPLICATE_BASE_URL=lying_fake)
    stack.start_worker()
    async with httpx.AsyncClient(base_url=stack.start_api(), timeout=10) as api:
        job_id = await submit(api, unique("from elsewhere"), width=512, height=512)

        status = await wait_for_job(api, job_id)

    assert status["status"] == "failed" and status["attempts"] == 1
    assert "output host not allowed: localhost" in status["error"]


async def test_outputs_over_the_size_cap_fail_the_job(make_stack: Any) -> None:
    stack: Stack = make_stack(MEDIAGEN_MAX_OUTPUT_BYTES="1000")
    stack.start_worker()
    async with httpx.AsyncClient(base_url=stack.start_api(), timeout=10) as api:
        job_id = await submit(api, unique("too big to keep"), width=512, height=512)

        status = await wait_for_job(api, job_id)

    assert status["status"] == "failed" and "too large" in status["error"]


SECRETS = {
    "token": "r8_supersecrettoken0123456789",
    "api_key": "mk_live_secret_api_key_42",
    "db_password": "pg-secret-password-77",
}


async def test_secrets_never_appear_in_logs_errors_or_answers(make_stack: Any, fake_replicate: Any) -> None:
    stack: Stack = make_stack()
    url = stack.database_url.replace("postgresql://postgres", f"postgresql://postgres:{SECRETS['db_password']}", 1)
    stack.env.update(
        DATABASE_URL=url,
        REPLICATE_API_TOKEN=SECRETS["token"],
        MEDIAGEN_API_KEYS=SECRETS["api_key"],
        MEDIAGEN_LOG_LEVEL="DEBUG",
    )
    stack.start_worker()
    headers = {"Authorization": f"Bearer {SECRETS['api_key']}"}
    async with httpx.AsyncClient(base_url=stack.start_api(), timeout=10, headers=headers) as api:
        ok = await submit(api, unique("a quiet harbour"), width=512, height=512)
        bad = await submit(api, unique("refused [[flagged]]"), width=512, height=512)
        retried = await submit(api, unique("throttled [[create:429*1:retry_after=1]]"), width=512, height=512)
        answers = [await wait_for_job(api, job_id) for job_id in (ok, bad, retried)]
        answers += [(await api.get(f"/jobs/{job_id}")).json() for job_id in (ok, bad, retried)]
        answers.append((await api.get("/jobs")).json())
        answers.append((await api.get("/readyz")).json())
        answers.append((await api.get("/jobs", headers={"Authorization": "Bearer wrong"})).json())

    assert answers[0]["status"] == "succeeded" and answers[1]["status"] == "failed"
    text = repr(answers) + (stack.workdir / "api.log").read_text() + (stack.workdir / "worker.log").read_text()
    assert "job.attempt.started" in text  # the logs were written and are being searched
    for name, secret in SECRETS.items():
        assert secret not in text, f"the {name} leaked"
