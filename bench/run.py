"""`make bench`: mediagen's benchmark against the real stack on loopback; prints a table, writes docs.

    python bench/run.py                      # full: every scenario, 3 runs each (writes docs/benchmarks.md)
    python bench/run.py --quick              # 1 run of each, fewer requests (writes nothing)
    python bench/run.py --scenario submit,status --runs 5
    python bench/run.py --scenario submit --api-env MEDIAGEN_DB_POOL_SIZE=64 --floor-pool 10   # try a setting

Scenarios (bench/README.md explains each and how to read the table): submit (beside its floor, see
bench/floor.py), status, inflight, overhead, retries; then, time permitting, overhead once more with the
worker logging at INFO. Every request count, wait and process is bounded; everything started here is
stopped in a `finally`, even on error or Ctrl-C (and by the kernel if this process is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (str(ROOT / "src"), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

import asyncpg  # noqa: E402
import redis  # noqa: E402

from floor import BODY  # noqa: E402
from mediagen.core.db import libpq_url  # noqa: E402
from mediagen.settings import Settings  # noqa: E402
from profiling import Sampler, py_spy, top_frames  # noqa: E402
from report import Row, render_block, text_table, write_docs  # noqa: E402
from stack import LOOPBACK, MachineCpu, Stack, http, tree_cpu, tree_rss  # noqa: E402


def _default(name: str) -> object:
    """A service setting's default, as the code has it (for the run's description)."""
    return Settings.model_fields[name].default


def _machine_rows(scenario: str, runs: list[dict[str, Any]]) -> list[Row]:
    """How busy the whole machine was during the measured requests (all processes, both cores)."""
    shares = [r["machine"] for r in runs if r.get("machine")]
    if len(shares) != len(runs):
        return []
    return [
        Row(scenario, "machine CPU busy % during the load (ref.)", [100 * m["busy"] for m in shares], fmt="{:.0f}"),
        Row(
            scenario, "machine CPU stolen by the hypervisor % (ref.)", [100 * m["steal"] for m in shares], fmt="{:.0f}"
        ),
    ]


SCENARIOS = ("submit", "status", "inflight", "overhead", "retries")
CONCURRENCY = 64
TERMINAL = "('succeeded', 'failed', 'canceled')"
# What Dramatiq logs (at ERROR) when an actor raises: the message is failed, not retried by Dramatiq.
ACTOR_FAILED = "Failed to process message"
QUIET_FAKE = {"latency": 0.0, "p_create_500": 0.0, "p_create_429": 0.0, "p_get_503": 0.0, "p_get_429": 0.0}
# The INFO-logs run of the overhead scenario starts only if the run so far took less than this.
INFO_RUN_BUDGET_S = 250.0
# Scenario 5 measures the retry machinery, not the backoff policy: a short backoff keeps it in budget
# (the runner still waits at least 1 s before each retry, MIN_RESEND_DELAY).
RETRY_ENV = {"MEDIAGEN_RETRY_BASE_SECONDS": "0.25", "MEDIAGEN_RETRY_CAP_SECONDS": "2"}
# Each end-to-end run gives up after this many seconds from its first submit (4x the in-flight target):
# a slower run is reported as "≥ limit" rather than stretching `make bench` past 5 minutes.
RUN_LIMIT_S = {"inflight": 40.0, "overhead": 60.0, "retries": 60.0}
# What the first run of a scenario still to come is expected to take (its share of the budget).
RUN_RESERVE_S = {"submit": 15.0, "status": 5.0, "inflight": 40.0, "overhead": 20.0, "retries": 20.0}


@dataclass(frozen=True)
class Plan:
    runs: int
    submit: int
    status: int
    inflight: int
    overhead: int
    retries: int
    warmup: int
    info_run: bool


# The sizes: 2,000 jobs for the overhead, 500 for the retries (at ~150 jobs/s the whole run
# stays well under 5 minutes; `--size NAME=N` changes them).
FULL = Plan(runs=3, submit=2000, status=3000, inflight=1000, overhead=2000, retries=500, warmup=300, info_run=True)
QUICK = Plan(runs=1, submit=500, status=1000, inflight=300, overhead=300, retries=100, warmup=100, info_run=False)

# In flight: 1,000 jobs must all wait on their prediction at once, and each in-flight async message
# holds one Dramatiq thread, so threads = jobs (fewer would run them in waves of 2 s + polling).
# Overhead and retries run the service's default (256).
INFLIGHT_THREADS = 1000


def ms(seconds: float) -> float:
    return seconds * 1000.0


class Bench:
    def __init__(self, stack: Stack, plan: Plan, args: argparse.Namespace) -> None:
        self.stack = stack
        self.plan = plan
        self.args = args
        self.began = time.monotonic()
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.details: dict[str, Any] = {}
        self.profiles: dict[str, Path] = {}
        self.db: asyncpg.Connection | None = None
        self.paths_file = stack.workdir / "status_paths.txt"

    # --- helpers ----------------------------------------------------------------------------------

    async def _child(self, argv: list[str], limit: float) -> dict[str, Any]:
        """Run a bench script in its own process; its last stdout line is JSON."""
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.stack.env()
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), limit)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[1]} exited {proc.returncode}: {err.decode()[-2000:]}")
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result

    async def load(self, n: int, *, post: bool, time_limit: float = 60.0) -> dict[str, Any]:
        """bench/loadgen.py against the API: POST /generate, or GET each /status path in turn."""
        argv = [sys.executable, str(BENCH / "loadgen.py"), "--port", str(self.stack.api_port)]
        argv += ["-n", str(n), "-c", str(CONCURRENCY), "--time-limit", str(time_limit)]
        if post:
            argv += ["--method", "POST", "--path", "/generate", "--body", json.dumps(BODY)]
        else:
            argv += ["--paths-file", str(self.paths_file)]
        return await self._child(argv, time_limit + 30)

    async def api_load(self, n: int, *, post: bool = True) -> dict[str, Any]:
        """POST /generate (or GET the status paths) n times; adds the API process's CPU ms per request
        and how busy the whole machine was (`machine`: busy and steal shares, see MachineCpu)."""
        assert self.stack.api is not None
        before = tree_cpu(self.stack.api.pid)
        machine = MachineCpu()
        machine.start()
        result = await self.load(n, post=post)
        result["machine"] = machine.stop()
        result["cpu_ms_per_request"] = ms(tree_cpu(self.stack.api.pid) - before) / max(1, result["requests"])
        return result

    async def floor(self, n: int, *, modes: str = "autocommit,transaction,grouped") -> dict[str, Any]:
        argv = [sys.executable, str(BENCH / "floor.py"), "-n", str(n), "-c", str(CONCURRENCY)]
        argv += ["--pool-size", str(self.args.floor_pool), "--modes", modes, "--paths-file", str(self.paths_file)]
        return await self._child(argv, 150)

    async def one(self, sql: str, *args: Any) -> Any:
        assert self.db is not None
        return await self.db.fetchrow(sql, *args)

    def profile(self, name: str, pid: int, rate: int) -> Sampler | None:
        if not self.args.profile or not py_spy():
            return None
        path = self.stack.workdir / f"profile-{name}.txt"
        self.profiles[name] = path
        return Sampler(pid, path, rate)

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    # --- 1. submit ----------------------------------------------------------------------------------

    async def submit(self) -> None:
        n = self.plan.submit
        await self.load(self.plan.warmup, post=True)  # the API's pools, prepared statements, imports
        await self.floor(min(200, n))
        api_runs: list[dict[str, Any]] = []
        floor_runs: list[dict[str, Any]] = []
        txn_runs: list[float] = []
        grouped_runs: list[float] = []
        ratios: list[float] = []
        for index in range(self.plan.runs):
            self.stack.reset_data()
            # Alternate which goes first, so a drift in the machine's load favours neither.
            if index % 2 == 0:
                api = await self.api_load(n)
                floor = await self.floor(n)
            else:
                floor = await self.floor(n)
                api = await self.api_load(n)
            if api["ok"] != n:
                self.notes.append(
                    f"submit run {index + 1}: {api['ok']} of {n} answered 202 "
                    f"(statuses {api['statuses']}, errors {api['errors']})"
                )
            api_runs.append(api)
            floor_runs.append(floor["autocommit"])
            txn_runs.append(floor["transaction"]["rps"])
            grouped_runs.append(floor["grouped"]["rps"])
            ratios.append(api["rps"] / floor["autocommit"]["rps"])
        if self.args.profile and py_spy():
            self.stack.reset_data()
            assert self.stack.api is not None
            sampler = self.profile("submit-api", self.stack.api.pid, rate=200)
            await self.load(max(4 * n, 5000), post=True)  # longer, for enough samples
            if sampler:
                sampler.stop()
        self.details["submit"] = {"api": api_runs, "floor": floor_runs}
        s = "1. Submit"
        self.rows += [
            Row(s, "POST /generate req/s", [r["rps"] for r in api_runs], "≥ 1,000", lambda v: v >= 1000),
            Row(s, "p50 latency ms", [r["p50_ms"] for r in api_runs], fmt="{:.1f}"),
            Row(s, "p99 latency ms", [r["p99_ms"] for r in api_runs], "< 100", lambda v: v < 100, "{:.1f}"),
            Row(s, "floor jobs/s (asyncpg INSERT + enqueue)", [r["rps"] for r in floor_runs]),
            Row(s, "floor p99 ms", [r["p99_ms"] for r in floor_runs], fmt="{:.1f}"),
            Row(s, "submit / floor", ratios, "≥ 0.50", lambda v: v >= 0.5, "{:.2f}"),
            Row(s, "API CPU ms/request", [r["cpu_ms_per_request"] for r in api_runs], fmt="{:.2f}"),
            Row(s, "floor CPU ms/job (its own process)", [r["cpu_ms_per_job"] for r in floor_runs], fmt="{:.2f}"),
            Row(s, "floor jobs/s with BEGIN/INSERT/COMMIT (ref.)", txn_runs),
            Row(s, "floor jobs/s with the API's group commit (ref.)", grouped_runs),
            *_machine_rows(s, api_runs),
        ]

    # --- 2. status ----------------------------------------------------------------------------------

    async def status(self) -> None:
        count = (await self.one("SELECT count(*) AS n FROM jobs"))["n"]
        if count < 500:
            await self.load(1000, post=True)
        assert self.db is not None
        ids = [row["id"] for row in await self.db.fetch("SELECT id FROM jobs ORDER BY random() LIMIT 2000")]
        self.paths_file.write_text("".join(f"/status/{job_id}\n" for job_id in ids))
        await self.load(self.plan.warmup, post=False)
        await self.floor(min(500, self.plan.status), modes="status")
        runs, floors = [], []
        for index in range(self.plan.runs):
            # As for submit: alternate which goes first.
            if index % 2 == 0:
                result = await self.api_load(self.plan.status, post=False)
                floor = (await self.floor(self.plan.status, modes="status"))["status"]
            else:
                floor = (await self.floor(self.plan.status, modes="status"))["status"]
                result = await self.api_load(self.plan.status, post=False)
            if result["ok"] != self.plan.status:
                self.notes.append(
                    f"status run {index + 1}: {result['ok']} of {self.plan.status} answered 200 "
                    f"(statuses {result['statuses']}, errors {result['errors']})"
                )
            runs.append(result)
            floors.append(floor)
        if self.args.profile and py_spy():
            assert self.stack.api is not None
            sampler = self.profile("status-api", self.stack.api.pid, rate=200)
            await self.load(max(4 * self.plan.status, 10000), post=False)  # longer, for enough samples
            if sampler:
                sampler.stop()
        self.details["status"] = {"api": runs, "floor": floors}
        s = "2. Status"
        self.rows += [
            Row(s, "GET /status/{id} req/s", [r["rps"] for r in runs], "≥ 2,000", lambda v: v >= 2000),
            Row(s, "p99 latency ms", [r["p99_ms"] for r in runs], fmt="{:.1f}"),
            Row(s, "floor req/s (the route's SELECT on raw asyncpg, no HTTP)", [f["rps"] for f in floors]),
            Row(s, "status / floor", [r["rps"] / f["rps"] for r, f in zip(runs, floors, strict=True)], fmt="{:.2f}"),
            Row(s, "API CPU ms/request", [r["cpu_ms_per_request"] for r in runs], fmt="{:.2f}"),
            Row(s, "floor CPU ms/request (its own process)", [f["cpu_ms_per_job"] for f in floors], fmt="{:.2f}"),
            *_machine_rows(s, runs),
        ]

    # --- 3-5. end to end ----------------------------------------------------------------------------

    async def _warm_worker(self) -> None:
        """Wait until the new worker consumes, run one job through it, and forget that job."""
        worker = self.stack.worker
        assert worker is not None
        client = redis.Redis.from_url(self.stack.redis_url)
        try:
            deadline = time.monotonic() + 30
            while not client.exists(f"{self.stack.namespace}:__heartbeats__"):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start:\n{self.stack.log_tail('worker')}")
                await asyncio.sleep(0.05)
        finally:
            client.close()
        # Its consumers start before the worker has built its resources (see the report): give it time.
        await asyncio.sleep(0.5)
        job = http("POST", f"http://{LOOPBACK}:{self.stack.api_port}/generate", BODY)
        deadline = time.monotonic() + 30
        while True:
            row = await self.one("SELECT status FROM jobs WHERE id = $1::uuid", job["job_id"])
            if row is not None and row["status"] == "succeeded":
                break
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the warm-up job did not succeed ({row}):\n{self.stack.log_tail('worker')}")
            await asyncio.sleep(0.05)
        assert self.db is not None
        await self.db.execute("DELETE FROM jobs")

    async def end_to_end(
        self, scenario: str, n: int, fake: dict[str, Any], worker_env: dict[str, str], limit: float, profile: str = ""
    ) -> dict[str, Any]:
        """A fresh worker; n jobs submitted through the API at concurrency 64; wait until all have ended."""
        stack = self.stack
        stack.stop_worker()
        stack.reset_data()
        stack.fake_config(**QUIET_FAKE)
        worker = stack.start_worker(**{**UNLIMITED_ACCOUNT, **worker_env, **self.args.worker_env})
        try:
            await self._warm_worker()
            stack.fake_reset()
            stack.fake_config(**{**QUIET_FAKE, **fake})
            assert stack.api is not None
            cpu0, api_cpu0 = tree_cpu(worker.pid), tree_cpu(stack.api.pid)
            actor_errors0 = stack.count_in_log("worker", ACTOR_FAILED)
            peak_rss = tree_rss(worker.pid)
            # py-spy samples only the thread holding the GIL (--gil), but keep the rate modest anyway.
            sampler = self.profile(profile, worker.pid, rate=100) if profile else None
            load = asyncio.create_task(self.load(n, post=True, time_limit=limit))
            deadline = time.monotonic() + limit
            timed_out = False
            timed_out_at = 0.0
            peak_ours = peak_clients = 0
            while True:
                peak_rss = max(peak_rss, tree_rss(worker.pid))
                row = await self.one(
                    f"SELECT count(*) AS all, count(*) FILTER (WHERE status IN {TERMINAL}) AS done, "
                    "(SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()) AS ours, "
                    "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS clients "
                    "FROM jobs"
                )
                peak_ours = max(peak_ours, row["ours"])
                peak_clients = max(peak_clients, row["clients"])
                if load.done() and row["done"] >= row["all"]:
                    break
                if time.monotonic() > deadline or worker.poll() is not None:
                    timed_out = True
                    timed_out_at = time.time()
                    break
                await asyncio.sleep(0.1)
            cpu1, api_cpu1 = tree_cpu(worker.pid), tree_cpu(stack.api.pid)
            if sampler:
                sampler.stop()
            submitted = await load
            stats = await self.one(
                "SELECT count(*) AS all, count(*) FILTER (WHERE status = 'succeeded') AS succeeded, "
                "count(*) FILTER (WHERE status = 'failed') AS failed, "
                f"count(*) FILTER (WHERE status NOT IN {TERMINAL}) AS unfinished, "
                "avg(attempts)::float AS attempts, max(attempts) AS max_attempts, "
                "extract(epoch FROM max(finished_at))::float AS last_finished FROM jobs"
            )
            assert self.db is not None
            failures = {
                f"{row['outcome']}:{row['error_class']}": row["n"]
                for row in await self.db.fetch(
                    "SELECT outcome, error_class, count(*) AS n FROM attempts WHERE outcome <> 'succeeded' "
                    "GROUP BY 1, 2 ORDER BY 3 DESC"
                )
            }
            timing = await self.one(
                "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP "
                "(ORDER BY extract(epoch FROM started_at - created_at)) AS wait, "
                "percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP "
                "(ORDER BY extract(epoch FROM finished_at - started_at)) AS run FROM jobs WHERE status = 'succeeded'"
            )
            dead = self._dead_letters()
            actor_errors = stack.count_in_log("worker", ACTOR_FAILED) - actor_errors0
            fake_stats = stack.fake_stats()
        finally:
            stack.stop_worker()
        # Timed out: the time so far, a lower bound (the note says so).
        wall = (timed_out_at if timed_out else stats["last_finished"] or time.time()) - submitted["started_at"]
        result = {
            "accepted": submitted["ok"],
            "submit_seconds": submitted["seconds"],
            "submit_rps": submitted["rps"],
            "jobs": stats["all"],
            "succeeded": stats["succeeded"],
            "failed": stats["failed"],
            "unfinished": stats["unfinished"],
            "attempts_per_job": stats["attempts"],
            "max_attempts": stats["max_attempts"],
            "attempt_failures": failures,
            "queue_wait_p50_p99_s": [round(v, 3) for v in timing["wait"] or []],
            "claim_to_finish_p50_p99_s": [round(v, 3) for v in timing["run"] or []],
            "dead_letters": dead,
            "actor_errors": actor_errors,
            "wall_seconds": wall,
            "timed_out": timed_out,
            "worker_cpu_seconds": cpu1 - cpu0,
            "api_cpu_seconds": api_cpu1 - api_cpu0,
            "worker_peak_rss_mb": peak_rss / 1024 / 1024,
            "peak_pg_connections_bench_db": peak_ours,
            "peak_pg_client_connections_all": peak_clients,
            "api_statuses": submitted["statuses"],
            "load_errors": submitted["errors"],
            "fake_creates": fake_stats.get("creates"),
            "fake_faults": fake_stats.get("faults"),
        }
        fault_free = not any(key.startswith("p_") and value for key, value in fake.items())
        if timed_out or submitted["ok"] != n or dead or actor_errors or (fault_free and failures):
            self.notes.append(self._describe(scenario + (" (profiled)" if profile else ""), n, result))
        return result

    @staticmethod
    def _describe(scenario: str, n: int, r: dict[str, Any]) -> str:
        """One line for the notes: what went wrong in an end-to-end run, and where its time went."""
        failures = ", ".join(
            f"{k.split(':', 1)[1]} x {v} ({k.split(':', 1)[0]})" for k, v in r["attempt_failures"].items()
        )
        wait, run = r["queue_wait_p50_p99_s"] or ["?", "?"], r["claim_to_finish_p50_p99_s"] or ["?", "?"]
        parts = [
            f"{scenario}: {r['accepted']:,} of {n:,} accepted (HTTP {r['api_statuses']}"
            + (f", client errors {r['load_errors']}" if r["load_errors"] else "")
            + f"), {r['succeeded']:,} succeeded, {r['failed']:,} failed, {r['unfinished']:,} unfinished",
            f"wall {r['wall_seconds']:.1f} s" + (" (time limit hit: a lower bound)" if r["timed_out"] else ""),
            f"queue wait p50/p99 {wait[0]}/{wait[1]} s, claim to finish p50/p99 {run[0]}/{run[1]} s",
            f"attempts that did not succeed: {failures or 'none'}",
            f"messages failed by an error escaping the actor: {r['actor_errors']} (dead-lettered at the end: "
            f"{r['dead_letters']})",
            f"peak PostgreSQL connections {r['peak_pg_connections_bench_db']} (server: "
            f"{r['peak_pg_client_connections_all']})",
        ]
        return "; ".join(parts)

    def _dead_letters(self) -> int:
        """Messages Dramatiq gave up on (its dead-letter sorted set, `<ns>:<queue>.XQ`)."""
        client = redis.Redis.from_url(self.stack.redis_url)
        try:
            return int(client.zcard(f"{self.stack.namespace}:mediagen.XQ"))
        finally:
            client.close()

    async def repeat(self, scenario: str, one_run: Callable[[], Awaitable[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The scenario's runs; after the first, a run starts only if it still fits the time budget.

        The budget (`--budget`, 285 s) keeps `make bench` under 5 minutes on a slow day: a run is
        assumed to take as long as the previous one, and the first run of each scenario still to
        come keeps a reserve (RUN_RESERVE_S).
        """
        runs: list[dict[str, Any]] = []
        later = self.args.scenarios[self.args.scenarios.index(scenario) + 1 :]
        reserve = sum(RUN_RESERVE_S.get(name, 10.0) for name in later)
        last = 0.0
        for index in range(self.plan.runs):
            if index and self.elapsed() + last + reserve > self.args.budget:
                self.notes.append(
                    f"{scenario}: {index} of {self.plan.runs} runs, the others skipped to stay within "
                    f"the {self.args.budget:.0f} s budget"
                )
                break
            began = time.monotonic()
            runs.append(await one_run())
            last = time.monotonic() - began
        return runs

    @staticmethod
    def _problem_rows(s: str, runs: list[dict[str, Any]], fault_free: bool) -> list[Row]:
        rows = [
            Row(s, "messages failed by an error escaping the actor", [r["actor_errors"] for r in runs], "= 0",
                lambda v: v == 0, every_run=True)
        ]  # fmt: skip
        if fault_free:
            rows.append(
                Row(
                    s,
                    "attempts that did not succeed (no fault injected)",
                    [sum(r["attempt_failures"].values()) for r in runs],
                    "= 0",
                    lambda v: v == 0,
                    every_run=True,
                )
            )
        return rows

    async def inflight(self) -> None:
        n = self.plan.inflight
        env = {"MEDIAGEN_WORKER_THREADS": str(INFLIGHT_THREADS)}
        fake = {"latency": 2.0}
        runs = await self.repeat("inflight", lambda: self.end_to_end("inflight", n, fake, env, RUN_LIMIT_S["inflight"]))
        if self.args.profile and py_spy():
            await self.end_to_end("inflight", n, fake, env, limit=RUN_LIMIT_S["inflight"], profile="inflight-worker")
        self.details["inflight"] = runs
        s = f"3. In flight ({n:,} x 2 s)"
        wall_check: Callable[[float], bool] | None = (lambda v: v <= 10) if n == 1000 else None
        self.rows += [
            Row(s, "wall s, first submit -> last succeeded", [r["wall_seconds"] for r in runs],
                "≤ 10" if n == 1000 else "(1,000 jobs: ≤ 10)", wall_check, "{:.2f}"),
            Row(s, "worker peak RSS MB (process tree)", [r["worker_peak_rss_mb"] for r in runs], "< 250",
                lambda v: v < 250, "{:.0f}"),
            Row(s, "jobs succeeded", [r["succeeded"] for r in runs], f"= {n:,}", lambda v: v == n, every_run=True),
            *self._problem_rows(s, runs, fault_free=True),
        ]  # fmt: skip

    async def overhead(self) -> None:
        n = self.plan.overhead
        runs = await self.repeat("overhead", lambda: self.end_to_end("overhead", n, {}, {}, RUN_LIMIT_S["overhead"]))
        if self.args.profile and py_spy():
            await self.end_to_end("overhead", n, {}, {}, limit=RUN_LIMIT_S["overhead"], profile="overhead-worker")
        self.details["overhead"] = runs
        s = f"4. Overhead ({n:,} x 0 s)"
        self.rows += [
            Row(s, "jobs/s end to end", [r["succeeded"] / r["wall_seconds"] for r in runs], "≥ 150",
                lambda v: v >= 150),
            Row(s, "worker CPU ms/job", [ms(r["worker_cpu_seconds"]) / n for r in runs], "< 5", lambda v: v < 5,
                "{:.2f}"),
            Row(s, "API CPU ms/job (ref.)", [ms(r["api_cpu_seconds"]) / n for r in runs], fmt="{:.2f}"),
            Row(s, "jobs succeeded", [r["succeeded"] for r in runs], f"= {n:,}", lambda v: v == n, every_run=True),
            *self._problem_rows(s, runs, fault_free=True),
        ]  # fmt: skip

    async def overhead_info(self) -> None:
        """Overhead once more with the worker logging every event (INFO), to show what logs cost."""
        if self.elapsed() > INFO_RUN_BUDGET_S:
            self.notes.append(f"the INFO-logs run was skipped: {self.elapsed():.0f} s had passed")
            return
        n = min(self.plan.overhead, 300)
        env = {"MEDIAGEN_LOG_LEVEL": "INFO"}
        info = await self.end_to_end("overhead-info", n, {}, env, limit=RUN_LIMIT_S["overhead"])
        self.details["overhead_info_logs"] = info
        s = f"4b. Overhead, worker logs at INFO (1 run, {n:,} jobs)"
        self.rows += [
            Row(s, "jobs/s end to end", [info["succeeded"] / info["wall_seconds"]]),
            Row(s, "worker CPU ms/job", [ms(info["worker_cpu_seconds"]) / n], fmt="{:.2f}"),
        ]

    async def retries(self) -> None:
        n = self.plan.retries
        fake = {"p_create_500": 0.3}
        runs = await self.repeat(
            "retries", lambda: self.end_to_end("retries", n, fake, RETRY_ENV, RUN_LIMIT_S["retries"])
        )
        self.details["retries"] = runs
        s = f"5. Retries ({n:,}, 30% create 500s)"
        self.rows += [
            Row(s, "wall s, first submit -> last ended", [r["wall_seconds"] for r in runs], "report", None, "{:.1f}"),
            Row(s, "attempts per job (avg)", [r["attempts_per_job"] for r in runs], "report", None, "{:.2f}"),
            Row(s, "jobs succeeded", [r["succeeded"] for r in runs], "report"),
            Row(s, "jobs failed (attempts exhausted)", [r["failed"] for r in runs], "report"),
            Row(s, "jobs lost (not ended, or not accepted)", [n - r["succeeded"] - r["failed"] for r in runs],
                "= 0", lambda v: v == 0, every_run=True),
            *self._problem_rows(s, runs, fault_free=False),
        ]  # fmt: skip

    async def run(self, scenarios: list[str]) -> None:
        self.db = await asyncpg.connect(libpq_url(self.stack.database_url))
        try:
            self.stack.start_api(**self.args.api_env)
            steps = list(scenarios)
            if "overhead" in scenarios and self.plan.info_run and not self.args.no_info_run:
                steps.append("overhead_info")
            for name in steps:
                began = time.monotonic()
                print(f"[bench] {name} ... ({self.elapsed():.0f} s so far)", file=sys.stderr, flush=True)
                await getattr(self, name)()
                print(f"[bench] {name} done in {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
                if name in ("submit", "status"):
                    self.stack.reset_data()  # the queue filled while no worker ran: flush it
        finally:
            await self.db.close()


# Scenarios 3-5 measure the worker against a fake that never says no, as an account whose limits Replicate
# raised would: the shared budget's defaults (600 creates a minute) would otherwise cap them at 10 jobs/s.
# bench/limits.py measures the service under the real limits.
UNLIMITED_ACCOUNT = {"MEDIAGEN_REPLICATE_CREATES_PER_MINUTE": "0", "MEDIAGEN_REPLICATE_REQUESTS_PER_MINUTE": "0"}


def settings_lines(plan: Plan, stack: Stack, args: argparse.Namespace) -> list[tuple[str, str]]:
    lines = [
        ("load", f"concurrency {CONCURRENCY}, HTTP/1.1 keep-alive, bench/loadgen.py in its own process (uvloop); "
                 f"per run: submit {plan.submit:,} requests, status {plan.status:,}, in flight {plan.inflight:,} "
                 f"jobs, overhead {plan.overhead:,}, retries {plan.retries:,}; {plan.runs} runs per scenario"),
        ("API", "uvicorn, 1 process, uvloop + httptools, no access log, service defaults (database pool 20 + 20 "
                "overflow); warmed with a few hundred requests before the first measured run"),
        ("floor", f"bench/floor.py, one process (uvloop), 64 tasks, asyncpg pool of {args.floor_pool}, mediagen's "
                  "Dispatcher on redis-py's BlockingConnectionPool(64); the API and the floor alternate which goes "
                  "first, in each run"),
        ("worker", f"python -m mediagen.worker, MEDIAGEN_WORKER_PROCESSES=1; MEDIAGEN_WORKER_THREADS="
                   f"{INFLIGHT_THREADS} in scenario 3, 256 (the default) in 4 and 5; a fresh worker per run, "
                   "warmed with one job; not running during 1 and 2"),
        ("service env", "MEDIAGEN_LOG_LEVEL=WARNING (the worker at INFO in 4b only); MEDIAGEN_POLL_INITIAL_SECONDS "
                        f"/ MEDIAGEN_POLL_MAX_SECONDS at their defaults {_default('poll_initial_seconds')} / "
                        f"{_default('poll_max_seconds')}; everything else at its default "
                        "but in 5: MEDIAGEN_RETRY_BASE_SECONDS=0.25, MEDIAGEN_RETRY_CAP_SECONDS=2 (5 attempts); "
                        "in 3-5 the shared Replicate budget is off (MEDIAGEN_REPLICATE_CREATES_PER_MINUTE=0, "
                        "MEDIAGEN_REPLICATE_REQUESTS_PER_MINUTE=0): the fake there never says no"),
        ("jobs in 3-5", "submitted through the API (POST /generate, concurrency 64) while the worker runs; wall "
                        "time = the last `finished_at` in PostgreSQL - the first request sent; a run gives up after "
                        + ", ".join(f"{k} {v:.0f} s" for k, v in RUN_LIMIT_S.items())
                        + " (then its wall time is a lower bound, see the notes)"),
        ("fake Replicate", "one process; latency 2.0 s (3), 0 (4), 0 with p_create_500 0.3 (5)"),
        ("data", f"database {stack.database_name} and Redis namespace {stack.namespace}, removed after the run"),
    ]  # fmt: skip
    for who, env in (("API", args.api_env), ("worker", args.worker_env)):
        if env:
            lines.append((f"{who} overrides", ", ".join(f"{k}={v}" for k, v in env.items())))
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="mediagen's benchmark on the real stack (loopback only)")
    add = parser.add_argument
    add("--quick", action="store_true", help="1 run per scenario, fewer requests; writes no docs")
    add("--scenario", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    add("--runs", type=int, default=None, help="runs per scenario (the median is reported)")
    add("--size", action="append", default=[], metavar="NAME=N", help="requests/jobs per run, e.g. overhead=2000")
    add("--no-write", action="store_true", help="print the table only")
    add("--write", action="store_true", help="write docs/benchmarks.md even with --quick")
    add("--no-info-run", action="store_true", help="skip the overhead run with the worker logging at INFO")
    add(
        "--profile",
        action="store_true",
        help="extra unmeasured runs under py-spy (API: submit and status; worker: 3 and 4)",
    )
    add("--api-env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for the API")
    add("--worker-env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for the worker")
    add("--floor-pool", type=int, default=40, help="the floor's asyncpg pool size (default 40)")
    add("--keep", action="store_true", help="keep the work dir (logs, profiles)")
    add("--json", type=Path, default=None, help="also write every run's raw figures to this file")
    add("--budget", type=float, default=285.0, help="skip 2nd/3rd runs that would end past this (s)")
    add("--time-limit", type=float, default=600.0, help="abort everything after this many seconds")
    args = parser.parse_args()
    scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {SCENARIOS}")
    args.scenarios = [s for s in SCENARIOS if s in scenarios]
    for option in (*args.api_env, *args.worker_env, *args.size):
        if "=" not in option:
            parser.error(f"{option!r}: expected NAME=VALUE")
    args.api_env = dict(item.split("=", 1) for item in args.api_env)
    args.worker_env = dict(item.split("=", 1) for item in args.worker_env)
    plan = QUICK if args.quick else FULL
    if args.runs is not None:
        plan = replace(plan, runs=max(1, min(args.runs, 20)))
    sizes = {f.name for f in fields(Plan)} - {"runs", "info_run"}
    for item in args.size:
        name, value = item.split("=", 1)
        if name not in sizes or not value.isdigit() or not 0 < int(value) <= 100_000:
            parser.error(f"--size {item!r}: NAME is one of {sorted(sizes)}, N in 1..100000")
        plan = replace(plan, **{name: int(value)})  # type: ignore[arg-type]
    args.plan = plan
    return args


def main() -> int:
    args = parse_args()
    plan: Plan = args.plan
    if args.profile and not py_spy():
        print("[bench] --profile: py-spy is not installed, running unprofiled", file=sys.stderr)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    load_at_start = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    with Stack(keep=args.keep or args.profile) as stack:
        bench = Bench(stack, plan, args)
        try:
            asyncio.run(asyncio.wait_for(bench.run(args.scenarios), timeout=args.time_limit))
        except TimeoutError:
            bench.notes.append(f"aborted after the {args.time_limit:.0f} s time limit")
        wall = bench.elapsed()
        stack.facts["load"] = f"{load_at_start} at start, {'{:.2f} {:.2f} {:.2f}'.format(*os.getloadavg())} at end"
        print(text_table(bench.rows))
        for note in bench.notes:
            print(f"note: {note}")
        print(f"wall time {wall:.0f} s; load average {stack.facts['load']}")
        for name, path in bench.profiles.items():
            top = top_frames(path)
            print(f"\nprofile {name} ({path}):")
            for kind in ("self", "inclusive"):
                print(f"  top by {kind} time:")
                for frame, share in top.get(kind, []):
                    print(f"    {share * 100:5.1f}%  {frame}")
        if args.json:
            args.json.write_text(json.dumps({"details": bench.details, "notes": bench.notes}, indent=2, default=str))
        if (not args.quick or args.write) and not args.no_write and bench.rows:
            shown = [a for i, a in enumerate(sys.argv[1:]) if a != "--json" and (i == 0 or sys.argv[i] != "--json")]
            command = " ".join(["python bench/run.py", *shown])
            block = render_block(bench.rows, stack.facts, settings_lines(plan, stack, args), bench.notes, wall, command)
            write_docs(ROOT / "docs" / "benchmarks.md", block)
            print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")
    # Missed targets are in the table (pass/FAIL), not the exit status: `make bench` is a measurement.
    return 0


if __name__ == "__main__":
    sys.exit(main())
