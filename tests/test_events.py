"""Results pushed: server-sent events through several API processes, resumable; and `Prefer: wait`."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

from conftest import Stack, start_api, submit, unique


async def read_events(client: httpx.AsyncClient, url: str, seen: list[dict[str, Any]], **headers: str) -> None:
    """Collect a stream's events (and its heartbeats, as {"ping": True}) until the server ends it."""
    async with client.stream("GET", url, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict[str, Any] = {}
        async for line in response.aiter_lines():
            if line.startswith(":"):
                seen.append({"ping": True})
            elif line.startswith("event:"):
                event["event"] = line[6:].strip()
            elif line.startswith("id:"):
                event["id"] = line[3:].strip()
            elif line.startswith("data:"):
                event["data"] = orjson.loads(line[5:].strip())
            elif not line and event:
                seen.append(event)
                event = {}


@pytest.mark.slow
async def test_an_sse_client_sees_queued_running_progress_succeeded_through_two_api_processes(
    make_stack: Any,
) -> None:
    stack: Stack = make_stack(MEDIAGEN_SSE_HEARTBEAT_SECONDS="0.2")
    submitting, second = await asyncio.gather(
        asyncio.to_thread(stack.start_api), asyncio.to_thread(start_api, stack.env, stack.workdir / "api-2.log")
    )
    streaming = second.extra["url"]
    stack.extra_processes = [second]  # stopped with the stack
    seen: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=submitting, timeout=10) as api, httpx.AsyncClient() as listener:
        job_id = await submit(api, unique("a lighthouse, slowly [[latency=1.5]]"))
        reader = asyncio.create_task(read_events(listener, f"{streaming}/jobs/{job_id}/events", seen))
        while not any(e.get("ping") for e in seen):  # queued, and the stream is kept alive meanwhile
            await asyncio.sleep(0.05)
        await asyncio.to_thread(stack.start_worker)  # only now can the job start
        await asyncio.wait_for(reader, 30)

    events = [e for e in seen if not e.get("ping")]
    statuses = [e["data"]["status"] for e in events]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded"
    assert "running" in statuses
    progress = [e["data"]["progress"] for e in events if e["event"] == "progress"]
    assert progress, f"no progress event in {events}"
    assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress) and progress[-1] > 0
    assert [e["event"] for e in events].index("progress") > statuses.index("running")
    assert events[-1]["data"]["result_urls"] and events[-1]["data"]["progress"] == 1.0
    assert len({e["id"] for e in events}) == len(events)

    # A client that lost its connection after "running" resumes with only what changed since.
    running = next(e for e in events if e["data"]["status"] == "running")
    resumed: list[dict[str, Any]] = []
    async with httpx.AsyncClient() as client:
        await read_events(client, f"{streaming}/jobs/{job_id}/events", resumed, **{"Last-Event-ID": running["id"]})
        assert [e["data"]["status"] for e in resumed] == ["succeeded"]
        caught_up: list[dict[str, Any]] = []
        await read_events(
            client, f"{submitting}/jobs/{job_id}/events", caught_up, **{"Last-Event-ID": events[-1]["id"]}
        )
        assert caught_up == []


async def test_the_events_of_an_unknown_job_are_a_404(api: httpx.AsyncClient) -> None:
    assert (await api.get(f"/jobs/{uuid.uuid4()}/events")).status_code == 404


@pytest.mark.usefixtures("worker")
async def test_prefer_wait_answers_with_the_finished_job(api: httpx.AsyncClient) -> None:
    started = time.monotonic()
    answer = await api.post(
        "/generate", json={"prompt": unique("a quick lighthouse")}, headers={"Prefer": "wait=20"}, timeout=30
    )

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "succeeded" and body["result_urls"]
    assert answer.headers["Preference-Applied"] == "wait=20"
    assert time.monotonic() - started < 10
    image = await api.get(body["result_urls"][0])
    assert image.content.startswith(b"\x89PNG")


@pytest.mark.usefixtures("worker")
async def test_prefer_wait_answers_202_when_the_job_outlasts_it(api: httpx.AsyncClient) -> None:
    started = time.monotonic()
    answer = await api.post(
        "/generate", json={"prompt": unique("a slow lighthouse [[latency=5]]")}, headers={"Prefer": "wait=1"}
    )

    assert answer.status_code == 202
    assert 0.9 < time.monotonic() - started < 4
    assert answer.json()["status"] == "queued"
