"""The chaos run's provider faults: a long outage of every Replicate endpoint, and ambiguous creates.

Both run the service with its default retry, lease and circuit settings (5 attempts, backoff from 1 s,
the circuit opening after 10 failed calls in a row and probing every 10 s), two workers, and the fake
Replicate as the only faulty part:

* `outage`: jobs submitted and their predictions running at the fake, then every `/v1/` endpoint
  answers 503 for `--outage` seconds (`POST /_fake/outage`) while more jobs are submitted; the
  predictions made before it finish during it, unseen. Every job must end succeeded, none failed by the
  outage, each paid once. The status of every job is read every few seconds meanwhile, to count those
  that say `waiting_for: provider`.
* `ambiguous`: a share of creates make their prediction and then answer 502 or 504, or drop the
  connection (`p_create_ambiguous`): the next attempt must find that prediction in Replicate's list
  and adopt it, never make a second.

Billed twice: more than one prediction made at the fake for one job (each job has its own prompt).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import httpx

from chaoskit import (
    Verdict,
    attempt_endings,
    attempts_per_job,
    failure_reasons,
    job_counts,
    last_finished_at,
    log_events,
    predictions_by_prompt,
    spawn_worker,
    stop_worker,
    submit_all,
    wait_terminal,
)
from stack import LOOPBACK, Stack, http

# The service's defaults but for the log level (the verdict counts log events) and the pool.
WORKER_ENV = {"MEDIAGEN_LOG_LEVEL": "INFO", "MEDIAGEN_DB_POOL_SIZE": "5"}


def _billed_twice(stack: Stack, prompts: list[str]) -> tuple[int, int]:
    """(jobs with more than one prediction made, predictions made for these jobs)."""
    made = predictions_by_prompt(stack)
    return sum(1 for prompt in prompts if made.get(prompt, 0) > 1), sum(made.get(prompt, 0) for prompt in prompts)


def _statuses(client: httpx.Client, ids: list[str]) -> list[dict[str, Any]]:
    bodies = []
    for job_id in ids:
        response = client.get(f"/status/{job_id}")
        if response.status_code == 200:
            bodies.append(response.json())
    return bodies


def outage(args: argparse.Namespace) -> Verdict:
    with Stack(log_level="INFO", keep=args.keep) as stack:
        workdir = stack.workdir
        stack.fake_config(latency=args.outage_latency, latency_jitter=0.2, seed=20261208)
        stack.start_api(MEDIAGEN_DB_POOL_SIZE="10")
        api = f"http://{LOOPBACK}:{stack.api_port}"
        workers = [spawn_worker(stack, f"worker-{n}", WORKER_ENV) for n in range(2)]
        run = uuid.uuid4().hex[:6]
        before = [f"outage {run} in flight {n}" for n in range(args.in_flight)]
        during = [f"outage {run} during {n}" for n in range(args.during)]
        prompts = before + during
        to_submit = list(during)
        loop = asyncio.new_event_loop()
        client = httpx.Client(base_url=api, timeout=30)
        try:
            ids = loop.run_until_complete(submit_all(api, before))
            # In flight: each job's prediction made and running at the fake (or 30 s, whichever first).
            give_up = time.monotonic() + 30
            while stack.fake_stats()["predictions"] < len(before) and time.monotonic() < give_up:
                time.sleep(0.2)
            made_before = stack.fake_stats()["predictions"]
            running_before = job_counts(stack.database_url).get("running", 0)

            http("POST", f"{stack.fake_url}/_fake/outage", {"seconds": args.outage})
            started = time.monotonic()
            ends = started + args.outage
            # The jobs of `during` go in one by one across the outage's first four fifths.
            spacing = args.outage * 0.8 / max(1, len(to_submit))
            next_submit, next_look = started + 2.0, started + 2.0
            waiting: set[str] = set()
            failed_during = 0
            while time.monotonic() < ends:
                now = time.monotonic()
                if to_submit and now >= next_submit:
                    ids += loop.run_until_complete(submit_all(api, [to_submit.pop(0)], concurrency=1))
                    next_submit += spacing
                if now >= next_look:
                    bodies = _statuses(client, ids)
                    waiting |= {body["job_id"] for body in bodies if body.get("waiting_for") == "provider"}
                    failed_during = sum(1 for body in bodies if body["status"] == "failed")
                    next_look = now + 5.0
                time.sleep(0.2)
            ended_at = time.time()
            total = len(ids)
            wait_terminal(stack.database_url, total, args.timeout)
        finally:
            client.close()
            loop.close()
            for worker in workers:
                stop_worker(worker)

        counts = job_counts(stack.database_url)
        twice, made = _billed_twice(stack, prompts)
        mean, most = attempts_per_job(stack.database_url)
        events = log_events(stack.workdir)
        faults = stack.fake_stats()["faults"]
        last = last_finished_at(stack.database_url)
        failed = counts.get("failed", 0)
        reasons = failure_reasons(stack.database_url)
        endings = attempt_endings(stack.database_url)
    verdict = Verdict(
        workdir=workdir,
        jobs=args.in_flight + args.during,
        submitted=total,
        counts=counts,
        billed_twice=twice,
        attempts_mean=mean,
        attempts_max=most,
        failed_by_fault=failed,  # the outage is the only fault injected: any failure is its doing
    )
    verdict.rows = [
        (
            "jobs submitted (202)",
            total,
            f"{args.in_flight} before the outage ({made_before} predictions made, {running_before} jobs running "
            f"when it began), {args.during} during it",
        ),
        ("outage", f"{args.outage:g} s", f"every /v1/ endpoint 503; {faults.get('outage_503', 0)} requests refused"),
        ("jobs terminal", verdict.terminal, f"{counts.get('succeeded', 0)} succeeded, {failed} failed"),
        ("lost", verdict.lost, "accepted, not terminal at the end; must be 0"),
        ("billed twice", twice, f"jobs with more than one prediction made; {made} predictions for {total} jobs"),
        ("failed by the outage", failed, f"must be 0 ({reasons}); {failed_during} seen failed during it"),
        ("attempts per job", f"{mean:.2f} mean, {most} most", "an outage spends none"),
        ("attempts not succeeded", endings, "by outcome and error class"),
        ("jobs seen `waiting_for: provider`", len(waiting), "GET /status of every job every 5 s during the outage"),
        (
            "circuit",
            f"{events['provider.circuit.opened']} opened, {events['provider.circuit.probe_failed']} probes failed, "
            f"{events['provider.circuit.closed']} closed",
            "`provider.circuit.*` lines of the workers",
        ),
        (
            "drained",
            f"{last - ended_at:.1f} s" if last is not None else "-",
            "from the outage's end to the last job's `finished_at`",
        ),
    ]
    return verdict


def ambiguous(args: argparse.Namespace) -> Verdict:
    with Stack(log_level="INFO", keep=args.keep) as stack:
        workdir = stack.workdir
        stack.fake_config(
            latency=1.0,
            p_create_ambiguous=args.ambiguous_share,
            create_ambiguous_answers="502,504,drop",
            seed=20261208,
        )
        stack.start_api(MEDIAGEN_DB_POOL_SIZE="10")
        api = f"http://{LOOPBACK}:{stack.api_port}"
        workers = [spawn_worker(stack, f"worker-{n}", WORKER_ENV) for n in range(2)]
        run = uuid.uuid4().hex[:6]
        prompts = [f"ambiguous {run} job {n}" for n in range(args.ambiguous_jobs)]
        loop = asyncio.new_event_loop()
        try:
            started = time.monotonic()
            ids = loop.run_until_complete(submit_all(api, prompts))
            wait_terminal(stack.database_url, len(ids), args.timeout)
            wall = time.monotonic() - started
        finally:
            loop.close()
            for worker in workers:
                stop_worker(worker)
        counts = job_counts(stack.database_url)
        twice, made = _billed_twice(stack, prompts)
        mean, most = attempts_per_job(stack.database_url)
        events = log_events(stack.workdir)
        stats = stack.fake_stats()
        answers = {k.removeprefix("create_ambiguous_"): v for k, v in stats["faults"].items() if "ambiguous" in k}
        reasons = failure_reasons(stack.database_url)
        endings = attempt_endings(stack.database_url)
    verdict = Verdict(
        workdir=workdir,
        jobs=args.ambiguous_jobs,
        submitted=len(ids),
        counts=counts,
        billed_twice=twice,
        attempts_mean=mean,
        attempts_max=most,
        failed_by_fault=counts.get("failed", 0),  # ambiguous creates are the only fault injected
    )
    shown = ", ".join(f"{count} {answer}" for answer, count in sorted(answers.items())) or "none"
    verdict.rows = [
        ("jobs submitted (202)", len(ids), f"{args.ambiguous_share:.0%} of creates ambiguous"),
        (
            "ambiguous creates",
            sum(answers.values()),
            f"{shown}, of {stats['creates']} create requests: each made its prediction",
        ),
        ("jobs terminal", verdict.terminal, verdict.outcomes),
        ("lost", verdict.lost, "accepted, not terminal at the end; must be 0"),
        ("billed twice", twice, f"jobs with more than one prediction made; {made} predictions for {len(ids)} jobs"),
        ("failed", counts.get("failed", 0), f"must be 0 ({reasons})"),
        ("attempts per job", f"{mean:.2f} mean, {most} most", "an ambiguous create costs one attempt"),
        ("attempts not succeeded", endings, "by outcome and error class"),
        ("predictions adopted", events["job.prediction.adopted"], "`job.prediction.adopted`: found in the list"),
        ("wall time", f"{wall:.1f} s", "first submit to last terminal job"),
    ]
    return verdict
