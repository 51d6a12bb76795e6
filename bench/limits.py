"""Within Replicate's limits: 300 jobs through 3 worker processes against a fake that enforces them.

The fake Replicate enforces Replicate's numbers (600 creates a minute with a burst of 20, 3,000 other
requests a minute with a burst of 100) and runs each prediction for 2 s. Three worker processes, each
with its own settings as if on its own host, share one PostgreSQL and one Redis. Three runs:

* `no limiter, polls`: the shared budgets off (`MEDIAGEN_REPLICATE_*_PER_MINUTE=0`), polling as before;
* `limiter, polls`: the budgets on (600/min with a burst of 10, 3,000/min with a burst of 50);
* `limiter, webhooks`: the budgets on, and the fake's webhooks wake the attempts (`MEDIAGEN_REPLICATE_WEBHOOKS`).

Reported per run: wall time from the first submit to the last job's end against the floor the create
limit sets (300 / 10 per s = 30 s; target within 10 %), 429s the fake answered (target 0), GETs per
job (target at most 1.2 with webhooks; without them, the read budget never exceeded: the fake's own
limit refused none), attempts per job (target 1.0), and jobs that did not succeed.

Then one more run, the fair share of the create budget (mediagen.providers.fairshare) on a small account:
the fake allows 60 creates a minute (burst 10), the budget matches (60, burst 5); key a submits 100 jobs,
then, once the workers hold them, key b submits one. Reported: b's latency from submit to success
(target under 10 s; first come, first served it was 110 s), how many of a's jobs had succeeded by then,
and 429s.

    python bench/limits.py            # prints the tables and writes them into docs/benchmarks.md
    python bench/limits.py --no-write --jobs 100
    python bench/limits.py --no-write --mode fair
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mediagen.core.db import libpq_url
from stack import ROOT, Stack, free_port, kill_tree

CREATES_PER_MINUTE = 600
REQUESTS_PER_MINUTE = 3000
MODEL_SECONDS = 2.0
WORKERS = 3
BEGIN, END = "<!-- limits:begin -->", "<!-- limits:end -->"
FAIR_BEGIN, FAIR_END = "<!-- fair:begin -->", "<!-- fair:end -->"

FAKE = {
    "latency": MODEL_SECONDS,
    "create_rate_per_minute": CREATES_PER_MINUTE,
    "create_burst": 20,
    "request_rate_per_minute": REQUESTS_PER_MINUTE,
    "request_burst": 100,
}
MODES: dict[str, dict[str, str]] = {
    "no limiter, polls": {
        "MEDIAGEN_REPLICATE_CREATES_PER_MINUTE": "0",
        "MEDIAGEN_REPLICATE_REQUESTS_PER_MINUTE": "0",
    },
    "limiter, polls": {},
    "limiter, webhooks": {"MEDIAGEN_REPLICATE_WEBHOOKS": "true"},
}


def query(stack: Stack, sql: str) -> Any:
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn:
        return conn.execute(sql).fetchone()


async def submit_all(api: str, jobs: int) -> float:
    started = time.time()
    async with httpx.AsyncClient(base_url=api, timeout=30, limits=httpx.Limits(max_connections=32)) as client:

        async def submit(i: int) -> None:
            # Retry-safe with an Idempotency-Key: a dropped connection is tried again, never doubled.
            for _ in range(5):
                try:
                    answer = await client.post(
                        "/generate",
                        json={"prompt": f"a lighthouse #{i}", "parameters": {}},
                        headers={"Idempotency-Key": f"bench-{started}-{i}"},
                    )
                    if answer.status_code in (200, 202):
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.5)
            raise RuntimeError(f"job {i} could not be submitted")

        await asyncio.gather(*(submit(i) for i in range(jobs)))
    return started


def run_mode(stack: Stack, name: str, env: dict[str, str], jobs: int, limit: float) -> dict[str, Any]:
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn:
        conn.execute("TRUNCATE jobs CASCADE")
    stack.flush_redis()
    stack.fake_config(**FAKE)
    api = f"http://127.0.0.1:{stack.api_port}"
    common = {
        **env,
        "MEDIAGEN_REPLICATE_WEBHOOK_BASE_URL": api,
        "MEDIAGEN_LOG_LEVEL": "INFO",  # the test harness waits for worker.started
        # Four processes on a PostgreSQL shared with others: a few connections each is plenty.
        "MEDIAGEN_DB_POOL_SIZE": "5",
    }
    workers = [
        stack._spawn(
            f"worker-{i}",
            [sys.executable, "-m", "mediagen.worker"],
            **common,
            MEDIAGEN_WORKER_METRICS_PORT=str(free_port()),
            MEDIAGEN_WORKER_THREADS=str(threads),
        )
        for i, threads in enumerate((256, 200, 300))
    ]
    try:
        for i in range(WORKERS):
            log = stack.workdir / f"worker-{i}.log"
            deadline = time.monotonic() + 30
            while b"worker.started" not in log.read_bytes().split(b"worker.stopped")[-1]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {i} did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)
        stack.fake_reset()
        started = asyncio.run(submit_all(api, jobs))
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            done = query(stack, "SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'canceled')")[0]
            if done >= jobs:
                break
            time.sleep(0.2)
        row = query(
            stack,
            "SELECT count(*) FILTER (WHERE status = 'succeeded'), avg(attempts)::float, "
            "extract(epoch FROM max(finished_at))::float FROM jobs",
        )
        stats = stack.fake_stats()
    finally:
        for worker in workers:
            kill_tree(worker, timeout=30)
    faults = stats.get("faults", {})
    requests = stats.get("requests", {})
    wall = (row[2] or time.time()) - started
    return {
        "mode": name,
        "jobs": jobs,
        "succeeded": row[0],
        "wall_s": wall,
        "floor_s": jobs / (CREATES_PER_MINUTE / 60),
        "throttled": faults.get("rate_limited_create", 0)
        + faults.get("rate_limited_request", 0)
        + faults.get("create_429", 0),
        "gets_per_job": requests.get("gets", 0) / jobs,
        "reads_per_min": 60 * (requests.get("gets", 0) + requests.get("lists", 0)) / max(wall, 1e-9),
        "attempts_per_job": row[1] or 0.0,
        "webhooks": stats.get("webhooks", {}).get("delivered", 0),
    }


FAIR_KEYS = ("bench-fair-key-a", "bench-fair-key-b")
FAIR_FAKE = {**FAKE, "create_rate_per_minute": 60, "create_burst": 10}
FAIR_BACKLOG = 100


def run_fair(stack: Stack) -> dict[str, Any]:
    """Key a's backlog of 100, then key b's one job, at 60 creates a minute: b's latency."""
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn:
        conn.execute("TRUNCATE jobs CASCADE")
    stack.flush_redis()
    stack.fake_config(**FAIR_FAKE)
    stack.stop_api()
    stack.start_api(MEDIAGEN_API_KEYS=",".join(FAIR_KEYS))
    api = f"http://127.0.0.1:{stack.api_port}"
    common = {
        "MEDIAGEN_REPLICATE_CREATES_PER_MINUTE": "60",
        "MEDIAGEN_REPLICATE_CREATE_BURST": "5",
        "MEDIAGEN_LOG_LEVEL": "INFO",
        "MEDIAGEN_DB_POOL_SIZE": "5",
    }
    workers = [
        stack._spawn(
            f"fair-worker-{i}",
            [sys.executable, "-m", "mediagen.worker"],
            **common,
            MEDIAGEN_WORKER_METRICS_PORT=str(free_port()),
            MEDIAGEN_WORKER_THREADS="128",
        )
        for i in range(WORKERS)
    ]
    try:
        for i in range(WORKERS):
            log = stack.workdir / f"fair-worker-{i}.log"
            deadline = time.monotonic() + 30
            while b"worker.started" not in log.read_bytes().split(b"worker.stopped")[-1]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {i} did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)
        stack.fake_reset()
        b_latency, a_done, place = asyncio.run(_a_then_b(stack, api))
        stats = stack.fake_stats()
    finally:
        for worker in workers:
            kill_tree(worker, timeout=30)
        stack.stop_api()
        stack.start_api()
    faults = stats.get("faults", {})
    return {
        "b_latency_s": b_latency,
        "a_done": a_done,
        "a_place": place,
        "throttled": faults.get("rate_limited_create", 0) + faults.get("rate_limited_request", 0),
    }


async def _a_then_b(stack: Stack, api: str) -> tuple[float, int, int | None]:
    """(b's latency, a's jobs succeeded when b's did, the place one of a's waiting jobs showed)."""
    async with httpx.AsyncClient(base_url=api, timeout=30) as client:
        a, b = ({"Authorization": f"Bearer {key}"} for key in FAIR_KEYS)
        answers = await asyncio.gather(
            *(
                client.post("/generate", json={"prompt": f"a's backlog #{i}", "parameters": {}}, headers=a)
                for i in range(FAIR_BACKLOG)
            )
        )
        if any(answer.status_code != 202 for answer in answers):
            raise RuntimeError(f"a's submits: {[answer.status_code for answer in answers]}")
        deadline = time.monotonic() + 30
        while query(stack, "SELECT count(*) FROM jobs WHERE status = 'running'")[0] < FAIR_BACKLOG - 10:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not take a's jobs")
            await asyncio.sleep(0.1)
        started = time.monotonic()
        job = (await client.post("/generate", json={"prompt": "b's one", "parameters": {}}, headers=b)).json()
        status = "queued"
        while status not in ("succeeded", "failed", "canceled") and time.monotonic() - started < 120:
            await asyncio.sleep(0.05)
            status = (await client.get(f"/status/{job['job_id']}", headers=b)).json()["status"]
        latency = time.monotonic() - started
        if status != "succeeded":
            raise RuntimeError(f"b's job ended {status}")
        a_done = query(stack, "SELECT count(*) FROM jobs WHERE status = 'succeeded'")[0] - 1
        waiting = query(
            stack,
            "SELECT max(queue_position) FROM jobs WHERE status = 'running' AND queue_position IS NOT NULL",
        )[0]
        return latency, a_done, waiting


def fair_table(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| run | b's job: submit to success | a's jobs done by then | a's last place shown | 429s |",
            "|---|---|---|---|---|",
            f"| a's backlog of {FAIR_BACKLOG}, b's one job (60 creates/min) | {result['b_latency_s']:.1f} s | "
            f"{result['a_done']}/{FAIR_BACKLOG} | {result['a_place']} | {result['throttled']} |",
        ]
    )


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| run | jobs ok | wall (floor 30 s) | vs floor | 429s | GETs/job | reads/min (avg) | attempts/job |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['succeeded']}/{r['jobs']} | {r['wall_s']:.1f} s | "
            f"{(r['wall_s'] / r['floor_s'] - 1) * 100:+.0f} % | {r['throttled']} | {r['gets_per_job']:.2f} | "
            f"{r['reads_per_min']:.0f} | {r['attempts_per_job']:.2f} |"
        )
    return "\n".join(lines)


def write(
    block: str,
    begin: str = BEGIN,
    end: str = END,
    heading: str = "## Within Replicate's limits (`python bench/limits.py`)",
) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    section = f"{begin}\n{block}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument(
        "--mode", action="append", choices=[*MODES, "fair"], help="run only these (default: all, and fair)"
    )
    parser.add_argument("--limit", type=float, default=90.0, help="give up on a run after this many seconds")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    results = []
    with Stack(log_level="INFO", keep=args.keep) as stack:
        stack.start_api()
        for name in [mode for mode in args.mode or list(MODES) if mode != "fair"]:
            results.append(run_mode(stack, name, MODES[name], args.jobs, args.limit))
            print(table(results[-1:]).splitlines()[-1], flush=True)
        fair = run_fair(stack) if not args.mode or "fair" in args.mode else None
        if fair is not None:
            print(fair_table(fair), flush=True)
        facts = f"PostgreSQL {stack.facts.get('postgres_version')}, Redis {stack.facts.get('redis_version')}"
    rendered = table(results)
    if results:
        print(rendered)
    if not args.no_write and results:
        write(
            f"{rendered}\n\n{args.jobs} jobs, {MODEL_SECONDS:.0f} s model time, {WORKERS} worker processes; the fake "
            f"enforces {CREATES_PER_MINUTE} creates/min (burst 20) and {REQUESTS_PER_MINUTE} other requests/min "
            f"(burst 100). {facts}. Command: `python bench/limits.py`."
        )
    if not args.no_write and fair is not None:
        write(
            f"{fair_table(fair)}\n\nThe fair share of the create budget: the fake allows 60 creates/min (burst 10), "
            f"the service's budget matches (60/min, burst 5); {MODEL_SECONDS:.0f} s model time, {WORKERS} worker "
            f"processes. Key a submits {FAIR_BACKLOG} jobs; once the workers hold them, key b submits one. Served "
            "first come, first served (before), b's job succeeded after 110 s. {facts}. Command: "
            "`python bench/limits.py --mode fair`.".replace("{facts}", facts),
            FAIR_BEGIN,
            FAIR_END,
            "## A fair share of the provider's budget (`python bench/limits.py --mode fair`)",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
