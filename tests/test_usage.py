"""Spend: every prediction's metrics and cost on record, a job's cost, and totals that match Replicate's count."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from conftest import FakeReplicate, private_fake, submit, unique, wait_for_job
from mediagen.devtools.embedded import free_port


@pytest.fixture
def own_fake(workdir: Any) -> Iterator[FakeReplicate]:
    """A fake of this test's own, so its count of images is this test's alone."""
    with private_fake(workdir, "usage-fake", latency=0.2) as fake:
        yield fake


async def test_usage_matches_the_images_replicate_made_and_each_job_shows_its_cost(
    make_stack: Any, own_fake: FakeReplicate
) -> None:
    metrics_port = free_port()
    stack = make_stack(REPLICATE_BASE_URL=own_fake.url, MEDIAGEN_WORKER_METRICS_PORT=str(metrics_port))
    stack.start_worker()
    async with httpx.AsyncClient(base_url=stack.start_api(), timeout=10) as api:
        one = await submit(api, unique("one fox"), width=512, height=512)
        three = await submit(api, unique("three foxes"), width=512, height=512, num_outputs=3)
        retried = await submit(api, unique("a fox, twice [[fail*1]]"), width=512, height=512)
        for job_id in (one, three, retried):
            assert (await wait_for_job(api, job_id))["status"] == "succeeded"
        views = {job_id: (await api.get(f"/jobs/{job_id}")).json() for job_id in (one, three, retried)}
        report = (await api.get("/usage", params={"since": "1h"})).json()
        refused = await api.get("/usage", params={"since": "yesterday"})

    made = own_fake.stats()["images"]
    assert made == 5
    assert report["total"]["images"] == made
    assert Decimal(report["total"]["cost_usd"]) == Decimal("0.003") * made
    [model] = report["by_model"]
    assert model["model"] == "black-forest-labs/flux-schnell" and model["images"] == made
    # The failed prediction of the retried job ran, but its price (per image, none made) is unknown.
    assert report["total"]["predictions"] == 4 and report["total"]["unpriced_predictions"] == 1
    assert [day["images"] for day in report["by_day"]] == [made]
    assert report["by_api_key"][0]["api_key"] == "anonymous"
    assert refused.status_code == 422

    assert Decimal(views[one]["cost_usd"]) == Decimal("0.003")
    assert Decimal(views[three]["cost_usd"]) == Decimal("0.009")
    assert views[retried]["cost_usd"] is None  # one of its predictions has no known cost
    failed_attempt, good_attempt = views[retried]["attempt_history"]
    assert failed_attempt["predict_time"] is not None and failed_attempt["cost_usd"] is None
    assert good_attempt["image_count"] == 1 and Decimal(good_attempt["cost_usd"]) == Decimal("0.003")

    scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    spent = [line for line in scraped.splitlines() if line.startswith("mediagen_spend_usd_total{")]
    assert spent and abs(float(spent[0].rsplit(" ", 1)[1]) - 0.015) < 1e-9

    cli = subprocess.run(
        [sys.executable, "-m", "mediagen.cli", "usage", "--since", "1h"],
        env={**stack.env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    total = next(line for line in cli.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1:3] == ["4", "5"] and "0.0150" in total


async def test_usage_looks_back_a_year_at_most(api: httpx.AsyncClient) -> None:
    year = await api.get("/usage", params={"since": "366d"})
    in_hours = await api.get("/usage", params={"since": f"{366 * 24}h"})
    longer = [await api.get("/usage", params={"since": since}) for since in ("367d", "8785h", "9000h", "99999d")]

    assert year.status_code == in_hours.status_code == 200
    for refused in longer:
        assert refused.status_code == 422
        assert [field["field"] for field in refused.json()["detail"]["fields"]] == ["query.since"]


async def test_a_canceled_prediction_is_billed_for_the_seconds_it_ran(make_stack: Any) -> None:
    stack = make_stack(MEDIAGEN_MODEL_PRICES='{"black-forest-labs/flux-schnell": {"per_second": "0.001"}}')
    stack.start_worker()
    async with httpx.AsyncClient(base_url=stack.start_api(), timeout=10) as api:
        job_id = await submit(api, unique("a long render [[latency=30]]"), width=512, height=512)
        await wait_for_job(api, job_id, until=("running",))
        await asyncio.sleep(1.0)  # it runs, and is billed, for a second or so
        assert (await api.post(f"/jobs/{job_id}/cancel")).status_code in (200, 202)
        assert (await wait_for_job(api, job_id, timeout=15))["status"] == "canceled"
        [attempt] = (await api.get(f"/jobs/{job_id}")).json()["attempt_history"]
        report = (await api.get("/usage", params={"since": "1h"})).json()

    assert attempt["outcome"] == "canceled" and attempt["predict_time"] >= 0.5
    cost = Decimal(attempt["cost_usd"])
    assert cost == (Decimal("0.001") * Decimal(str(attempt["predict_time"]))).quantize(Decimal("0.000001"))
    assert Decimal(report["total"]["cost_usd"]) == cost
