"""Operators can see what the API and the workers do: Prometheus metrics on both."""

from __future__ import annotations

import re

import httpx
import pytest

from conftest import Process, submit, unique, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_the_api_counts_requests_by_route_and_status(api: httpx.AsyncClient) -> None:
    await api.get("/status/00000000-0000-0000-0000-000000000000")

    text = (await api.get("/metrics")).text

    assert sample(text, "mediagen_http_requests_total", route="/status/{job_id}", status="404") >= 1
    assert sample(text, "mediagen_http_request_seconds_count", route="/status/{job_id}") >= 1


async def test_the_worker_counts_attempts_retries_and_outcomes(
    api: httpx.AsyncClient, worker: Process, service_env: dict[str, str]
) -> None:
    job_id = await submit(api, unique("measured [[create:500*1]]"), width=512, height=512)
    await wait_for_job(api, job_id)

    [port] = re.findall(r'"metrics_port":(\d+)', worker.log_path.read_text())[:1]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text

    assert sample(text, "mediagen_attempts_total", outcome="failed", error_class="Replicate500") >= 1
    assert sample(text, "mediagen_retries_scheduled_total", error_class="Replicate500") >= 1
    assert sample(text, "mediagen_jobs_finished_total", status="succeeded") >= 1
    assert sample(text, "mediagen_replicate_call_seconds_count", operation="create") >= 2
    assert sample(text, "mediagen_output_download_seconds_count") >= 1
    assert "mediagen_broker_queue_depth" in text
    assert "mediagen_predictions_in_flight" in text
