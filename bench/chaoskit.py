"""What every chaos scenario shares: workers to start and kill, submits, and the counts a verdict reads.

A scenario (bench/chaos.py, bench/chaos_provider.py) starts a `Stack`, runs its fault, waits for its
jobs to end and measures them with these helpers, each reading the truth where it lives: job and
attempt rows in PostgreSQL, predictions made at the fake Replicate (`/_fake/stats` `by_prompt`: every
job has a prompt of its own, so predictions per prompt are predictions per job), events in the
workers' JSON logs. `Verdict` gathers what each scenario reports (lost, billed twice, failed, attempts
per job) and `write_block` puts its table into docs/reliability.md between its own markers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mediagen.core.db import libpq_url
from stack import Stack

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("succeeded", "failed", "canceled")


def spawn_worker(stack: Stack, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`python -m mediagen.worker` in a session of its own (so a SIGKILL takes its whole tree), logging
    to `<name>.log` in the stack's workdir (appended across restarts)."""
    log = open(stack.workdir / f"{name}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "mediagen.worker"],
        env=stack.env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=stack.workdir,
        start_new_session=True,
    )


def sigkill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM (the worker hands its jobs back), then SIGKILL of its group if it takes too long."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        sigkill_group(proc)


async def submit_all(api: str, prompts: list[str], concurrency: int = 32) -> list[str]:
    """POST /generate for each prompt (512x512); the job ids, in no particular order."""
    ids: list[str] = []
    queue = collections.deque(prompts)
    async with httpx.AsyncClient(base_url=api, timeout=30) as client:

        async def one() -> None:
            while queue:
                prompt = queue.popleft()
                response = await client.post(
                    "/generate", json={"prompt": prompt, "parameters": {"width": 512, "height": 512}}
                )
                response.raise_for_status()
                ids.append(response.json()["job_id"])

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return ids


def connect(database_url: str, patience: float = 30.0) -> psycopg.Connection[tuple[Any, ...]]:
    """A connection to the run's database; refused ones (a shared server out of connections) are tried
    again for `patience` seconds."""
    give_up = time.monotonic() + patience
    while True:
        try:
            return psycopg.connect(libpq_url(database_url))
        except psycopg.OperationalError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.5)


def job_counts(database_url: str) -> dict[str, int]:
    with connect(database_url) as conn:
        rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
    return {status: count for status, count in rows}


def terminal_count(counts: dict[str, int]) -> int:
    return sum(counts.get(status, 0) for status in TERMINAL)


def failure_reasons(database_url: str) -> str:
    with connect(database_url) as conn:
        rows = conn.execute(
            "SELECT error_class, count(*) FROM jobs WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
    return ", ".join(f"{count} {error}" for error, count in rows) or "none"


def attempts_per_job(database_url: str) -> tuple[float, int]:
    """Mean and most attempts a job spent (`jobs.attempts`: claims that opened an attempt)."""
    with connect(database_url) as conn:
        mean, most = conn.execute("SELECT avg(attempts), max(attempts) FROM jobs").fetchone()  # type: ignore[misc]
    return float(mean or 0), int(most or 0)


def attempt_endings(database_url: str) -> str:
    """Attempts that did not succeed, by outcome and error class (the attempt rows, the record)."""
    with connect(database_url) as conn:
        rows = conn.execute(
            "SELECT outcome, coalesce(error_class, ''), count(*) FROM attempts "
            "WHERE outcome IS DISTINCT FROM 'succeeded' GROUP BY 1, 2 ORDER BY 3 DESC"
        ).fetchall()
    return ", ".join(f"{count} {outcome or 'open'} {error}".rstrip() for outcome, error, count in rows) or "none"


def attempt_counts(database_url: str) -> tuple[int, int]:
    with connect(database_url) as conn:
        total, finished = conn.execute("SELECT count(*), count(finished_at) FROM attempts").fetchone()  # type: ignore[misc]
    return int(total), int(finished)


def last_finished_at(database_url: str) -> float | None:
    """The latest `finished_at` of any job, as a Unix time."""
    with connect(database_url) as conn:
        (value,) = conn.execute("SELECT extract(epoch FROM max(finished_at)) FROM jobs").fetchone()  # type: ignore[misc]
    return float(value) if value is not None else None


def predictions_by_prompt(stack: Stack) -> dict[str, int]:
    """Predictions the fake made, per prompt: made is billed (unless it never started), whatever its end."""
    by_prompt: dict[str, int] = stack.fake_stats()["by_prompt"]
    return by_prompt


def succeeded_predictions_by_prompt(fake_url: str) -> collections.Counter[str]:
    """Succeeded predictions per prompt, read through the fake's list as a client would (all pages)."""
    counts: collections.Counter[str] = collections.Counter()
    url: str | None = f"{fake_url}/v1/predictions"
    for _ in range(10_000):
        if url is None:
            break
        page = httpx.get(url, headers={"Authorization": "Bearer chaos"}, timeout=30).json()
        for prediction in page["results"]:
            if prediction["status"] == "succeeded":
                counts[prediction["input"]["prompt"]] += 1
        url = page["next"]
    return counts


def log_events(workdir: Path, prefixes: Iterable[bytes] = (b'"job.', b'"provider.')) -> collections.Counter[str]:
    """Events of the workers' JSON lines (`worker-*.log`), counted by name."""
    events: collections.Counter[str] = collections.Counter()
    wanted = tuple(prefixes)
    for path in workdir.glob("worker-*.log"):
        for raw in path.read_bytes().splitlines():
            if raw.startswith(b"{") and any(prefix in raw for prefix in wanted):
                with contextlib.suppress(json.JSONDecodeError, KeyError):
                    events[json.loads(raw)["event"]] += 1
    return events


def polled_terminal(database_url: str) -> int:
    """Terminal jobs now, or -1 when PostgreSQL refused the connection (a shared server out of
    connections): a poll that tries again at its next turn rather than ending the run."""
    try:
        with connect(database_url, patience=0) as conn:
            rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
    except psycopg.OperationalError:
        return -1
    return terminal_count({status: count for status, count in rows})


def wait_terminal(database_url: str, jobs: int, timeout: float, step: float = 0.5) -> float:
    """Wait until `jobs` jobs are terminal or `timeout` s pass; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if polled_terminal(database_url) >= jobs:
            break
        time.sleep(step)
    return time.monotonic() - started


@dataclass
class Verdict:
    """What each scenario reports, and whether its promises held."""

    jobs: int
    submitted: int
    counts: dict[str, int]
    billed_twice: int
    """Jobs with more than one prediction made at the fake."""
    attempts_mean: float
    attempts_max: int
    failed_by_fault: int = 0
    """Jobs the injected fault failed (for faults that must fail none)."""
    extra_ok: bool = True
    workdir: Path | None = None
    rows: list[tuple[str, object, str]] = field(default_factory=list)

    @property
    def terminal(self) -> int:
        return terminal_count(self.counts)

    @property
    def outcomes(self) -> str:
        return ", ".join(f"{self.counts.get(status, 0)} {status}" for status in TERMINAL)

    @property
    def lost(self) -> int:
        return self.submitted - self.terminal

    @property
    def ok(self) -> bool:
        return (
            self.submitted == self.jobs
            and self.lost == 0
            and self.billed_twice == 0
            and self.failed_by_fault == 0
            and self.extra_ok
        )

    def table(self) -> list[str]:
        lines = ["| measure | value | note |", "|---|---|---|"]
        return lines + [f"| {a} | {b} | {c} |" for a, b, c in self.rows]


def write_block(name: str, heading: str, table: list[str], ok: bool) -> None:
    """docs/reliability.md: replace what lies between `<!-- name:begin -->` and `<!-- name:end -->`
    (appended at the end when the markers are missing)."""
    path = ROOT / "docs" / "reliability.md"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = "\n".join([begin, f"{heading} — **{'PASS' if ok else 'FAIL'}**", "", *table, end])
    text = path.read_text() if path.exists() else "# Reliability\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def machine_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores, load average {load:.1f} at the end"
