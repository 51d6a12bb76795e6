"""Failover: 200 jobs with Replicate down for the whole run, all served by fal; what the failover costs.

The fake Replicate answers 503 to everything for the whole run (`POST /_fake/outage`); the fake fal runs
each request for 2 s. One API and one worker process. Two runs, same jobs, same fake fal:

* `fal alone`: `MEDIAGEN_PROVIDERS=fal`, the baseline;
* `replicate down, failover`: `MEDIAGEN_PROVIDERS=replicate,fal`: every job tries Replicate first (a 503,
  then, once Replicate's circuit is open, no request at all) and fails over to fal.

Reported per run: jobs that succeeded and where (target: all on fal), wall time from the first submit to
the last job's end, each job's time from submit to end (median and 95th percentile), attempts per job,
failovers, requests Replicate answered (503s) and predictions it made (target 0), fal requests (target:
one per job, none billed twice). The overhead of failing over is the difference between the two runs.

    python bench/failover.py              # prints the table and writes it into docs/benchmarks.md
    python bench/failover.py --no-write --jobs 50
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limits import submit_all
from mediagen.core.db import libpq_url
from stack import LOOPBACK, ROOT, Stack, free_port, http, kill_tree

MODEL_SECONDS = 2.0
BEGIN, END = "<!-- failover:begin -->", "<!-- failover:end -->"
MODES: dict[str, dict[str, str]] = {
    "fal alone": {"MEDIAGEN_PROVIDERS": "fal"},
    "replicate down, failover": {"MEDIAGEN_PROVIDERS": "replicate,fal"},
}


def rows(stack: Stack, sql: str) -> list[Any]:
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn:
        return list(conn.execute(sql).fetchall())


def run_mode(stack: Stack, fal_url: str, name: str, env: dict[str, str], jobs: int, limit: float) -> dict[str, Any]:
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn:
        conn.execute("TRUNCATE jobs CASCADE")
    stack.flush_redis()
    stack.fake_reset()
    http("POST", f"{stack.fake_url}/_fake/outage", {"seconds": 3600})  # Replicate down for the whole run
    http("POST", f"{fal_url}/_fake/reset")
    common = {**env, "MEDIAGEN_FAL_BASE_URL": fal_url, "MEDIAGEN_LOG_LEVEL": "INFO", "MEDIAGEN_DB_POOL_SIZE": "5"}
    stack.start_api(**common)
    worker = stack._spawn(
        "worker", [sys.executable, "-m", "mediagen.worker"], **common, MEDIAGEN_WORKER_METRICS_PORT=str(free_port())
    )
    try:
        log = stack.workdir / "worker.log"
        deadline = time.monotonic() + 30
        while b"worker.started" not in log.read_bytes().split(b"worker.stopped")[-1]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        started = asyncio.run(submit_all(f"http://{LOOPBACK}:{stack.api_port}", jobs))
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            [(done,)] = rows(stack, "SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'canceled')")
            if done >= jobs:
                break
            time.sleep(0.2)
        [job] = rows(
            stack,
            "SELECT count(*) FILTER (WHERE status = 'succeeded' AND provider = 'fal'), avg(attempts)::float, "
            "extract(epoch FROM max(finished_at))::float FROM jobs",
        )
        seconds = [
            float(r[0])
            for r in rows(
                stack, "SELECT extract(epoch FROM finished_at - created_at) FROM jobs WHERE finished_at IS NOT NULL"
            )
        ]
        [attempt] = rows(
            stack,
            "SELECT count(*) FILTER (WHERE failover_from IS NOT NULL), "
            "count(DISTINCT prediction_id) FILTER (WHERE provider = 'fal'), "
            "count(*) FILTER (WHERE prediction_id IS NOT NULL) - count(DISTINCT prediction_id) FROM attempts",
        )
        # The failover itself, per job: from the attempt that met Replicate down to the one started at fal.
        steps = [
            float(r[0])
            for r in rows(
                stack,
                "SELECT extract(epoch FROM b.started_at - a.started_at) FROM attempts a JOIN attempts b "
                "ON b.job_id = a.job_id AND b.number = a.number + 1 WHERE b.failover_from IS NOT NULL",
            )
        ]
        replicate = stack.fake_stats()
        fal = http("GET", f"{fal_url}/_fake/stats")
    finally:
        kill_tree(worker, timeout=30)
        stack.stop_api()
    wall = (job[2] or time.time()) - started
    quantiles = statistics.quantiles(seconds, n=20) if len(seconds) > 1 else [0.0] * 19
    return {
        "mode": name,
        "jobs": jobs,
        "on_fal": job[0],
        "wall_s": wall,
        "p50_s": statistics.median(seconds) if seconds else 0.0,
        "p95_s": quantiles[18],
        "attempts_per_job": job[1] or 0.0,
        "step_p50_ms": 1000 * statistics.median(steps) if steps else None,
        "step_p95_ms": 1000 * statistics.quantiles(steps, n=20)[18] if len(steps) > 1 else None,
        "failovers": attempt[0],
        "fal_predictions": attempt[1],
        "shared_predictions": attempt[2],
        "replicate_503": replicate.get("faults", {}).get("outage_503", 0),
        "replicate_made": replicate.get("predictions", 0) if isinstance(replicate.get("predictions"), int) else 0,
        "fal_requests": fal.get("requests", 0),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| run | jobs ok on fal | wall | job p50 | job p95 | attempts/job | failovers | failover step p50 / p95 | "
        "Replicate 503s | made at Replicate | fal requests |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        step = "-" if r["step_p50_ms"] is None else f"{r['step_p50_ms']:.0f} / {r['step_p95_ms']:.0f} ms"
        lines.append(
            f"| {r['mode']} | {r['on_fal']}/{r['jobs']} | {r['wall_s']:.1f} s | {r['p50_s']:.2f} s | "
            f"{r['p95_s']:.2f} s | {r['attempts_per_job']:.2f} | {r['failovers']} | {step} | {r['replicate_503']} | "
            f"{r['replicate_made']} | {r['fal_requests']} |"
        )
    return "\n".join(lines)


def overhead(results: list[dict[str, Any]]) -> str:
    if len(results) != 2:
        return ""
    base, moved = results
    return (
        f"Failover overhead against fal alone: wall {moved['wall_s'] - base['wall_s']:+.1f} s for {moved['jobs']} "
        f"jobs, job p50 {moved['p50_s'] - base['p50_s']:+.2f} s, p95 {moved['p95_s'] - base['p95_s']:+.2f} s. Both "
        "runs are held to fal's submit budget (600 a minute, burst 10: 20 s for 200 jobs), which hides the "
        "failover's own cost in the wall time: the failover step (from the attempt that met Replicate down to "
        "the attempt started at fal) measures it per job. Most of that step is the wait for a Replicate "
        "create token (600 a minute, burst 10) before the create that meets the 503 or the open circuit: a "
        "reservation taken while the circuit was closed is slept out, not given up when it opens."
    )


def write(block: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    section = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = (
            text.rstrip() + "\n\n## Failover: Replicate down, fal up (`python bench/failover.py`)\n\n" + section + "\n"
        )
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--limit", type=float, default=120.0, help="give up on a run after this many seconds")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    results = []
    with Stack(log_level="INFO", keep=args.keep) as stack:
        port = free_port()
        fal = stack._spawn(
            "fake-fal",
            [
                sys.executable,
                "-m",
                "fake_fal",
                "--host",
                LOOPBACK,
                "--port",
                str(port),
                "--latency",
                str(MODEL_SECONDS),
            ],
        )
        fal_url = f"http://{LOOPBACK}:{port}"
        try:
            stack._wait_http(f"{fal_url}/_fake/stats", fal)
            for name, env in MODES.items():
                results.append(run_mode(stack, fal_url, name, env, args.jobs, args.limit))
                print(table(results[-1:]).splitlines()[-1], flush=True)
        finally:
            kill_tree(fal)
        facts = f"PostgreSQL {stack.facts.get('postgres_version')}, Redis {stack.facts.get('redis_version')}"
    rendered = table(results)
    print(rendered)
    print(overhead(results))
    if not args.no_write:
        write(
            f"{rendered}\n\n{overhead(results)}\n\n{args.jobs} jobs, {MODEL_SECONDS:.0f} s model time at the fake fal, "
            f"the fake Replicate answering 503 to everything; one API, one worker process. {facts}. "
            "Command: `python bench/failover.py`."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
