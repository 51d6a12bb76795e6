"""The chaos run: jobs through a faulty Replicate, three ways; no job lost, none paid for twice.

    python bench/chaos.py [--scenario kill,outage,ambiguous] [--jobs 500] [--outage 150] [--no-write]

* `kill`: 500 jobs while the fake Replicate fails 20% of creates with 500 and 10% with 429
  (Retry-After 1 s), answers 10% of GETs with 503, and takes 0.5 s per prediction. Two workers run; one
  of them is killed with SIGKILL 3 s after each time it came up, and started again; the other keeps
  running.
* `outage`: every Replicate endpoint answers 503 for 150 s with 30 jobs in flight, and 10 more are
  submitted during it (bench/chaos_provider.py).
* `ambiguous`: 30% of creates make their prediction, then answer 502 or 504 or drop the connection,
  over 100 jobs (bench/chaos_provider.py).

Each scenario runs on a stack of its own, waits for every job to reach a terminal state, and reports
jobs lost (accepted, not terminal at the end), billed twice (more than one prediction made at the fake
for one job), failed (by the injected fault, where it must fail none), attempts spent per job. The kill
scenario also holds the attempt rows against the workers' `job.attempt.*` log lines. Each table goes to
docs/reliability.md between its own markers; the exit status is 0 only when every scenario passed.
Everything runs on 127.0.0.1, bounded in count and time (the outage alone takes 3 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos_provider
from chaoskit import (
    Verdict,
    attempt_counts,
    attempt_endings,
    attempts_per_job,
    failure_reasons,
    job_counts,
    log_events,
    machine_note,
    polled_terminal,
    predictions_by_prompt,
    sigkill_group,
    spawn_worker,
    stop_worker,
    submit_all,
    succeeded_predictions_by_prompt,
    write_block,
)
from stack import LOOPBACK, Stack

KILL_ENV = {
    "MEDIAGEN_MAX_ATTEMPTS": "10",
    "MEDIAGEN_RETRY_BASE_SECONDS": "0.2",
    "MEDIAGEN_RETRY_CAP_SECONDS": "2",
    "MEDIAGEN_LEASE_SECONDS": "4",
    "MEDIAGEN_SWEEP_INTERVAL_SECONDS": "1",
    "MEDIAGEN_STALE_DISPATCH_SECONDS": "3",
    "MEDIAGEN_POLL_INITIAL_SECONDS": "0.2",
    "MEDIAGEN_POLL_MAX_SECONDS": "0.5",
    "MEDIAGEN_WORKER_THREADS": "200",
    "MEDIAGEN_LOG_LEVEL": "INFO",
    "MEDIAGEN_DB_POOL_SIZE": "5",
}
SCENARIOS = ("kill", "outage", "ambiguous")


def _chaos(
    args: argparse.Namespace, stack: Stack, api: str, prompts: list[str], victim: list[Any]
) -> tuple[int, float, int]:
    """Submit `prompts` while killing `victim[0]` (replaced in place at each kill) until every job ended or
    the time is up: (kills, wall time, jobs submitted or -1)."""
    started = time.monotonic()
    kills = 0
    submit = asyncio.new_event_loop()
    submitting = submit.create_task(submit_all(api, prompts))
    deadline = started + args.timeout
    # The victim is killed `kill_every` s after it came up (its `worker.started` line): on a busy
    # machine a worker takes seconds to boot, and killing it before then would kill nothing at work.
    boots = 0
    next_kill: float | None = None
    chaos_ends: float | None = None  # kills go on while jobs come in, and a while after
    try:
        while time.monotonic() < deadline:
            submit.run_until_complete(asyncio.sleep(0.2))
            if submitting.done() and chaos_ends is None:
                chaos_ends = time.monotonic() + args.chaos_after_submit
            if next_kill is None and stack.count_in_log("worker-victim", '"worker.started"') > boots:
                boots += 1
                next_kill = time.monotonic() + args.kill_every
            now = time.monotonic()
            if next_kill is not None and now >= next_kill and (chaos_ends is None or now < chaos_ends):
                sigkill_group(victim[0])
                kills += 1
                victim[0] = spawn_worker(stack, "worker-victim", KILL_ENV)
                next_kill = None
            if submitting.done() and polled_terminal(stack.database_url) >= args.jobs:
                break
        return kills, time.monotonic() - started, len(submitting.result()) if submitting.done() else -1
    finally:
        submit.close()


def kill(args: argparse.Namespace) -> Verdict:
    with Stack(log_level="INFO", keep=args.keep) as stack:
        workdir = stack.workdir
        stack.fake_config(latency=0.5, p_create_500=0.2, p_create_429=0.1, retry_after=1, p_get_503=0.1, seed=20261123)
        stack.start_api(MEDIAGEN_DB_POOL_SIZE="10", MEDIAGEN_MAX_ATTEMPTS=KILL_ENV["MEDIAGEN_MAX_ATTEMPTS"])
        api = f"http://{LOOPBACK}:{stack.api_port}"
        run = uuid.uuid4().hex[:6]
        prompts = [f"chaos {run} job {i}" for i in range(args.jobs)]
        steady = spawn_worker(stack, "worker-steady", KILL_ENV)
        victim = [spawn_worker(stack, "worker-victim", KILL_ENV)]
        try:
            kills, wall, submitted = _chaos(args, stack, api, prompts, victim)
        finally:  # the workers are no part of the Stack: stopped here, whatever happened
            sigkill_group(victim[0])
            stop_worker(steady)

        counts = job_counts(stack.database_url)
        stack.fake_config(p_get_503=0, p_get_429=0)  # the count itself must not meet injected faults
        paid = succeeded_predictions_by_prompt(stack.fake_url)
        made = predictions_by_prompt(stack)
        attempts, finished = attempt_counts(stack.database_url)
        mean, most = attempts_per_job(stack.database_url)
        reasons = failure_reasons(stack.database_url)
        endings = attempt_endings(stack.database_url)
        events = log_events(stack.workdir, (b'"job.attempt.',))
        stats = stack.fake_stats()

    twice = sum(1 for prompt in prompts if made.get(prompt, 0) > 1)
    paid_twice = sum(1 for prompt in prompts if paid[prompt] > 1)
    closed_lines = events["job.attempt.succeeded"] + events["job.attempt.failed"]
    # Lines are written right after their row is committed. A worker killed with SIGKILL takes with it
    # the lines of attempts it had committed but not yet logged (the database, the truth, has them), so
    # the log may fall short of the rows by a few lines per kill, and is reported; it must never claim
    # more than the database holds.
    verdict = Verdict(
        workdir=workdir,
        jobs=args.jobs,
        submitted=submitted,
        counts=counts,
        billed_twice=twice,
        attempts_mean=mean,
        attempts_max=most,
        extra_ok=paid_twice == 0 and attempts >= events["job.attempt.started"] and finished >= closed_lines,
    )
    verdict.rows = [
        ("jobs submitted (202)", submitted, ""),
        ("jobs terminal", verdict.terminal, verdict.outcomes),
        ("lost", verdict.lost, "accepted, not terminal at the end; must be 0"),
        ("why jobs failed", reasons, "errors after all attempts, or permanent ones"),
        ("billed twice", twice, "jobs with more than one prediction made at the fake; must be 0"),
        ("jobs with more than one succeeded prediction", paid_twice, "must be 0"),
        ("predictions created at the fake", stats["predictions"], f"{stats['creates']} create requests"),
        ("attempts per job", f"{mean:.2f} mean, {most} most", "30% of creates and 10% of GETs fail, and the kills"),
        ("attempts not succeeded", endings, "`WorkerLost`: the victim's, taken over once their lease ran out"),
        ("worker SIGKILLs", kills, f"each {args.kill_every:g} s after the victim came up"),
        (
            "attempt rows / job.attempt.started lines",
            f"{attempts} / {events['job.attempt.started']}",
            "equal but for lines a SIGKILL cut off; never more lines than rows",
        ),
        (
            "finished attempts / job.attempt.succeeded+failed lines",
            f"{finished} / {closed_lines}",
            "equal but for lines a SIGKILL cut off; never more lines than rows",
        ),
        ("wall time", f"{wall:.1f} s", "first submit to last terminal job"),
    ]
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--jobs", type=int, default=500, help="kill: jobs")
    parser.add_argument("--kill-every", type=float, default=3.0, help="kill: seconds from boot to SIGKILL")
    parser.add_argument(
        "--chaos-after-submit", type=float, default=20.0, help="kill: seconds the kills go on after the last submit"
    )
    parser.add_argument("--outage", type=float, default=150.0, help="outage: its length in seconds")
    parser.add_argument("--in-flight", type=int, default=30, help="outage: jobs in flight when it begins")
    parser.add_argument("--during", type=int, default=10, help="outage: jobs submitted during it")
    parser.add_argument("--outage-latency", type=float, default=20.0, help="outage: seconds per prediction")
    parser.add_argument("--ambiguous-jobs", type=int, default=100, help="ambiguous: jobs")
    parser.add_argument("--ambiguous-share", type=float, default=0.3, help="ambiguous: share of creates")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds a scenario waits for its jobs to end")
    parser.add_argument("--keep", action="store_true", help="keep each stack's workdir (logs)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/reliability.md")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.scenario.split(",") if name.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}")

    runs = {"kill": kill, "outage": chaos_provider.outage, "ambiguous": chaos_provider.ambiguous}
    commands = {
        "kill": f"--jobs {args.jobs} --kill-every {args.kill_every:g}",
        "outage": f"--outage {args.outage:g} --in-flight {args.in_flight} --during {args.during}",
        "ambiguous": f"--ambiguous-jobs {args.ambiguous_jobs} --ambiguous-share {args.ambiguous_share:g}",
    }
    passed = True
    for name in chosen:
        print(f"chaos scenario {name} …", flush=True)
        verdict = runs[name](args)
        table = verdict.table()
        print("\n".join(table))
        if args.keep:
            print("logs kept in", verdict.workdir)
        print(f"chaos {name}:", "PASS" if verdict.ok else "FAIL", flush=True)
        passed = passed and verdict.ok
        if not args.no_write:
            marker = "chaos" if name == "kill" else f"chaos-{name}"
            heading = (
                f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine_note()}: "
                f"`python bench/chaos.py --scenario {name} {commands[name]}`"
            )
            write_block(marker, heading, table, verdict.ok)
    print("chaos run:", "PASS" if passed else "FAIL")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
