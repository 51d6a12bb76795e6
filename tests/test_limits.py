"""Per-key limits: shared by every API process through Redis, refused with 429 and the IETF headers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port, start_api, stop

KEYS = ("key-rate", "key-jobs", "key-other")
PER_MINUTE = 60
MAX_UNFINISHED = 2


@pytest.fixture(scope="module")
def limited(service_env: dict[str, str], workdir: Path) -> Iterator[tuple[str, str]]:
    """Two API processes of one deployment, with keys and small limits."""
    settings = {
        "MEDIAGEN_API_KEYS": ",".join(KEYS),
        "MEDIAGEN_RATE_LIMIT_PER_MINUTE": str(PER_MINUTE),
        "MEDIAGEN_MAX_UNFINISHED_JOBS": str(MAX_UNFINISHED),
    }
    with ThreadPoolExecutor(2) as pool:  # both start at once
        apis = list(pool.map(lambda n: start_api(service_env, workdir / f"api-limited-{n}.log", **settings), range(2)))
    yield apis[0].extra["url"], apis[1].extra["url"]
    for process in apis:
        stop(process.proc)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_requests_per_minute_are_counted_across_api_processes(limited: tuple[str, str]) -> None:
    started, answers = time.monotonic(), []
    while not answers or answers[-1].status_code == 200:
        answers.append(httpx.get(f"{limited[len(answers) % 2]}/jobs", headers=auth("key-rate")))
        assert len(answers) <= 2 * PER_MINUTE
    refused = answers.pop()
    # The whole minute's quota at once, plus what refilled meanwhile (one a second), and not more.
    assert PER_MINUTE <= len(answers) <= PER_MINUTE + (time.monotonic() - started) + 1
    assert answers[0].headers["RateLimit-Policy"] == f'"requests";q={PER_MINUTE};w=60, "jobs";q={MAX_UNFINISHED}'
    assert answers[0].headers["RateLimit"].startswith(f'"requests";r={PER_MINUTE - 1};t=')

    assert refused.status_code == 429
    assert refused.json()["error"] == "rate_limited"
    assert refused.json()["detail"]["limit"] == "requests_per_minute"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60 // PER_MINUTE + 1
    assert refused.headers["RateLimit"].startswith('"requests";r=0;t=')
    assert "RateLimit-Policy" in refused.headers
    # Another key has a bucket of its own.
    assert httpx.get(f"{limited[1]}/jobs", headers=auth("key-other")).status_code == 200


def test_unfinished_jobs_at_once_are_limited_until_one_ends(limited: tuple[str, str]) -> None:
    def submit(url: str) -> httpx.Response:
        return httpx.post(
            f"{url}/generate", json={"prompt": "a slow lighthouse [[latency=30]]"}, headers=auth("key-jobs")
        )

    first, second = submit(limited[0]), submit(limited[1])
    assert (first.status_code, second.status_code) == (202, 202)
    assert second.headers["RateLimit"].endswith('"jobs";r=0')

    refused = submit(limited[0])

    assert refused.status_code == 429
    assert refused.json()["detail"]["limit"] == "unfinished_jobs"
    assert "Retry-After" in refused.headers
    job_id = first.json()["job_id"]
    assert httpx.post(f"{limited[1]}/jobs/{job_id}/cancel", headers=auth("key-jobs")).status_code in (200, 202)
    deadline = time.monotonic() + 10  # a running job ends once its worker has canceled the prediction
    while httpx.get(f"{limited[0]}/status/{job_id}", headers=auth("key-jobs")).json()["status"] != "canceled":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert submit(limited[1]).status_code == 202


def test_an_idempotent_replay_takes_no_second_slot(limited: tuple[str, str]) -> None:
    headers = {**auth("key-other"), "Idempotency-Key": "limits-replay"}
    body: dict[str, Any] = {"prompt": "the same slow request twice [[latency=30]]"}
    answers = [httpx.post(f"{limited[n % 2]}/generate", json=body, headers=headers) for n in range(3)]
    assert [a.status_code for a in answers] == [202, 200, 200]

    another = {"prompt": "another slow one [[latency=30]]"}
    assert httpx.post(f"{limited[0]}/generate", json=another, headers=auth("key-other")).status_code == 202
    assert httpx.post(f"{limited[1]}/generate", json=another, headers=auth("key-other")).status_code == 429


def test_without_api_keys_there_are_no_limits_by_default(api_url: str) -> None:
    answer = httpx.get(f"{api_url}/jobs?limit=1")
    assert answer.status_code == 200
    assert "RateLimit" not in answer.headers


@pytest.mark.usefixtures("worker")
def test_a_key_over_its_daily_spend_cap_gets_no_new_job(
    api_url: str, service_env: dict[str, str], workdir: Path
) -> None:
    # Given the anonymous caller has spent something today (a job at $0.003 an image)
    job = httpx.post(f"{api_url}/generate", json={"prompt": "a lighthouse that costs money"}).json()["job_id"]
    deadline = time.monotonic() + 20
    while httpx.get(f"{api_url}/jobs/{job}").json().get("cost_usd") is None:
        assert time.monotonic() < deadline, "the job's cost was never recorded"
        time.sleep(0.2)
    # When an API whose cap is below that is asked for another job
    capped = start_api(
        service_env,
        workdir / "api-capped.log",
        MEDIAGEN_LIMIT_ANONYMOUS="true",
        MEDIAGEN_DAILY_SPEND_CAP_USD="0.001",
        MEDIAGEN_RATE_LIMIT_PER_MINUTE="0",
        MEDIAGEN_MAX_UNFINISHED_JOBS="0",
    )
    try:
        url = capped.extra["url"]
        refused = httpx.post(f"{url}/generate", json={"prompt": "one more"})
        # Then it is refused until midnight UTC, and reading is still allowed
        assert refused.status_code == 429
        assert refused.json()["detail"]["limit"] == "daily_spend"
        assert 0 < int(refused.headers["Retry-After"]) <= 86_401
        assert refused.headers["RateLimit-Policy"] == '"spend";q=1000;qu="usd-micros";w=86400'
        assert httpx.get(f"{url}/jobs/{job}").status_code == 200
    finally:
        stop(capped.proc)


def test_with_keys_on_and_redis_unreachable_reads_and_submits_fail_open_never_500(make_stack: Any) -> None:
    # Given an API with keys and limits whose Redis does not answer (nothing listens on its port)
    stack = make_stack(
        MEDIAGEN_API_KEYS="key-a",
        MEDIAGEN_RATE_LIMIT_PER_MINUTE=str(PER_MINUTE),
        MEDIAGEN_MAX_UNFINISHED_JOBS=str(MAX_UNFINISHED),
        MEDIAGEN_DAILY_SPEND_CAP_USD="5",
    )
    url = stack.start_api(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    key = auth("key-a")

    # When a job is submitted and read every way a client reads it
    submitted = httpx.post(f"{url}/generate", json={"prompt": "a lighthouse while Redis is down"}, headers=key)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    reads = [
        httpx.get(f"{url}/status/{job_id}", headers=key),
        httpx.get(f"{url}/jobs/{job_id}", headers=key),
        httpx.get(f"{url}/jobs", headers=key),
        httpx.get(f"{url}/models", headers=key),
        httpx.get(f"{url}/media/{job_id}/0", headers=key),
    ]
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=key, timeout=5) as events:
        events_status = events.status_code

    # Then they are served from PostgreSQL (the media not yet made: 404), the limiter left out
    assert [answer.status_code for answer in reads] == [200, 200, 200, 200, 404], [a.text for a in reads]
    assert reads[0].json()["status"] == "queued"
    assert events_status == 200
    assert httpx.get(f"{url}/jobs", headers=auth("not-a-key")).status_code == 401
    failed_open = [line for line in stack.api.log_lines() if line.get("event") == "limits.failed_open"]
    assert len(failed_open) == 1  # once a minute, not once a request

    # And the committed job is dispatched by the sweep once a worker reaches Redis
    stack.start_worker()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/status/{job_id}", headers=key).json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the job was never dispatched"
        time.sleep(0.3)
