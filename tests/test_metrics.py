"""Operators can see what the API and the workers do: Prometheus metrics on both."""

from __future__ import annotations

import re
import socket

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


def families_without_samples(text: str) -> list[str]:
    typed = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    sampled = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    suffixes = ("", "_total", "_count", "_sum", "_bucket", "_created", "_info")
    return [name for name in typed if not any(name + suffix in sampled for suffix in suffixes)]


def worker_metrics_port(worker: Process) -> int:
    return int(re.findall(r'"metrics_port":(\d+)', worker.log_path.read_text())[0])


async def test_no_metric_family_is_shown_without_a_sample(api: httpx.AsyncClient, worker: Process) -> None:
    api_text = (await api.get("/metrics")).text
    worker_text = httpx.get(f"http://127.0.0.1:{worker_metrics_port(worker)}/metrics").text

    assert families_without_samples(api_text) == []
    assert families_without_samples(worker_text) == []
    assert "mediagen_http_requests_total" in api_text and "mediagen_predictions_in_flight" in worker_text


async def test_a_413_is_counted_under_its_route(api: httpx.AsyncClient) -> None:
    before = sample((await api.get("/metrics")).text, "mediagen_http_requests_total", route="/generate", status="413")

    response = await api.post("/generate", json={"prompt": "x" * 100_000})

    assert response.status_code == 413
    after = sample((await api.get("/metrics")).text, "mediagen_http_requests_total", route="/generate", status="413")
    assert after == before + 1


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_the_worker_metrics_port_is_not_reachable_from_another_host_by_default(worker: Process) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    port = worker_metrics_port(worker)

    assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{address}:{port}/metrics", timeout=2)
