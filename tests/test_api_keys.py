"""API keys as data: made with the CLI, each its own jobs, limits and webhook signatures; revoked
without a restart."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from conftest import RUN_ID, create_database, drop_database, kill_group, start_api, start_worker, stop
from mediagen.api.auth import KeyRing, Unauthorized
from mediagen.core import keys
from mediagen.core.db import Database, libpq_url
from mediagen.devtools.launcher import migrate
from mediagen.worker.delivery_sender import WebhookSender

LEGACY = "legacy-key-from-the-environment"


@dataclass
class Deployment:
    env: dict[str, str]
    url: str
    database_url: str


@pytest.fixture(scope="module")
def deployment(postgres_admin_url: str, service_env: dict[str, str], workdir: Path) -> Iterator[Deployment]:
    """A deployment of its own (its keys must not turn auth on for the other tests' API)."""
    name = f"mediagen_test_{RUN_ID}_keys_{uuid.uuid4().hex[:6]}"
    url = create_database(postgres_admin_url, name)
    migrate(url)
    env = {
        **service_env,
        "DATABASE_URL": url,
        "MEDIAGEN_REDIS_NAMESPACE": f"{service_env['MEDIAGEN_REDIS_NAMESPACE']}-keys",
        "MEDIAGEN_QUEUE_NAME": "keys",
        "MEDIAGEN_MEDIA_DIR": str(workdir / name / "media"),
        "MEDIAGEN_MAX_UNFINISHED_JOBS": "5",
        "MEDIAGEN_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "MEDIAGEN_WEBHOOK_POLL_SECONDS": "0.1",
    }  # no MEDIAGEN_WEBHOOK_SECRET: each key's own secret signs
    api = start_api(env, workdir / "api-keys.log")
    worker = start_worker(env, workdir / "worker-keys.log")
    yield Deployment(env, api.extra["url"], url)
    kill_group(worker.proc, 9)
    stop(api.proc)
    drop_database(postgres_admin_url, name)


def mediagen(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mediagen.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


@dataclass
class Made:
    key: str
    webhook_secret: str


def create_key(env: dict[str, str], name: str, *options: str) -> Made:
    made = mediagen(env, "keys", "create", name, *options)
    assert made.returncode == 0, made.stderr
    key = re.search(r"api key\s+(mg_\S+)", made.stdout)
    secret = re.search(r"webhook secret\s+(whsec_\S+)", made.stdout)
    assert key and secret, made.stdout
    return Made(key.group(1), secret.group(1))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Receiver:
    """Keeps every webhook as it came: raw body and headers, to verify with whichever secret."""

    url: str
    got: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    seen: threading.Condition = field(default_factory=threading.Condition)

    def for_job(self, job_id: str, timeout: float = 20.0) -> tuple[bytes, dict[str, str]]:
        with self.seen:
            assert self.seen.wait_for(lambda: any(job_id.encode() in body for body, _ in self.got), timeout)
            return next((body, headers) for body, headers in self.got if job_id.encode() in body)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server: ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state: Receiver = server.receiver  # type: ignore[attr-defined]
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with state.seen:
                state.got.append((body, {k.lower(): v for k, v in self.headers.items()}))
                state.seen.notify_all()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.receiver = Receiver(f"http://127.0.0.1:{server.server_address[1]}")  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.receiver  # type: ignore[attr-defined]
    server.shutdown()


def verifies(secret: str, delivery: tuple[bytes, dict[str, str]]) -> bool:
    try:
        Webhook(secret).verify(delivery[0], delivery[1])
    except WebhookVerificationError:
        return False
    return True


def test_the_first_key_made_turns_auth_on_without_a_restart(deployment: Deployment) -> None:
    # Given an API with no key anywhere: every caller is the anonymous one
    assert httpx.get(f"{deployment.url}/jobs").status_code == 200
    # When the first key is made
    made = create_key(deployment.env, "first")
    # Then, within a second or so, a key is needed, and this one works
    deadline = time.monotonic() + 3
    while httpx.get(f"{deployment.url}/jobs").status_code != 401:
        assert time.monotonic() < deadline, "the API never noticed the key"
        time.sleep(0.05)
    assert httpx.get(f"{deployment.url}/jobs", headers=auth(made.key)).status_code == 200


def test_two_keys_have_their_own_jobs_limits_and_webhook_signatures(deployment: Deployment, receiver: Receiver) -> None:
    a = create_key(deployment.env, "tenant-a", "--max-unfinished-jobs", "1", "--rate-per-minute", "300")
    b = create_key(deployment.env, "tenant-b")
    api = deployment.url

    def submit(key: str, prompt: str, **fields: Any) -> httpx.Response:
        return httpx.post(f"{api}/generate", json={"prompt": prompt, **fields}, headers=auth(key))

    # Own webhook signatures: no MEDIAGEN_WEBHOOK_SECRET on this deployment, each key's own secret signs
    job_a = submit(a.key, "a's lighthouse", webhook_url=f"{receiver.url}/a").json()["job_id"]
    job_b = submit(b.key, "b's lighthouse", webhook_url=f"{receiver.url}/b").json()["job_id"]
    for_a, for_b = receiver.for_job(job_a), receiver.for_job(job_b)
    assert verifies(a.webhook_secret, for_a) and not verifies(b.webhook_secret, for_a)
    assert verifies(b.webhook_secret, for_b) and not verifies(a.webhook_secret, for_b)

    # Own jobs: each sees its own, and nothing of the other's
    assert httpx.get(f"{api}/status/{job_a}", headers=auth(a.key)).status_code == 200
    assert httpx.get(f"{api}/status/{job_a}", headers=auth(b.key)).status_code == 404
    assert httpx.get(f"{api}/jobs/{job_b}", headers=auth(a.key)).status_code == 404
    listed_a = {job["job_id"] for job in httpx.get(f"{api}/jobs", headers=auth(a.key)).json()["items"]}
    listed_b = {job["job_id"] for job in httpx.get(f"{api}/jobs", headers=auth(b.key)).json()["items"]}
    assert job_a in listed_a and job_b not in listed_a
    assert job_b in listed_b and job_a not in listed_b

    # Own limits: a may have one job unfinished at once, b the default five
    slow = "a slow one [[latency=30]]"
    first = submit(a.key, slow)
    assert first.status_code == 202 and first.headers["RateLimit-Policy"] == '"requests";q=300;w=60, "jobs";q=1'
    refused = submit(a.key, slow)
    assert refused.status_code == 429 and refused.json()["detail"]["limit"] == "unfinished_jobs"
    answers = [submit(b.key, slow) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [202, 202]
    assert answers[0].headers["RateLimit-Policy"] == '"requests";q=600;w=60, "jobs";q=5'
    for job in [first, *answers]:
        owner = a if job is first else b
        httpx.post(f"{api}/jobs/{job.json()['job_id']}/cancel", headers=auth(owner.key))


def test_a_rotated_webhook_secret_and_the_previous_one_both_verify_during_the_overlap(
    deployment: Deployment, receiver: Receiver
) -> None:
    made = create_key(deployment.env, "rotating")
    rotated = mediagen(deployment.env, "keys", "rotate-webhook-secret", "rotating", "--overlap", "1h")
    assert rotated.returncode == 0, rotated.stderr
    found = re.search(r"webhook secret\s+(whsec_\S+)", rotated.stdout)
    assert found and "api key" not in rotated.stdout, rotated.stdout
    new_secret = found.group(1)

    job = httpx.post(
        f"{deployment.url}/generate",
        json={"prompt": "a lighthouse, rotated", "webhook_url": f"{receiver.url}/rotated"},
        headers=auth(made.key),
    ).json()["job_id"]
    delivery = receiver.for_job(job)

    assert len(delivery[1]["webhook-signature"].split(" ")) == 2
    assert verifies(new_secret, delivery) and verifies(made.webhook_secret, delivery)


def test_a_revoked_key_gets_401_within_a_second_and_a_rotated_one_keeps_its_jobs(deployment: Deployment) -> None:
    api = deployment.url
    made = create_key(deployment.env, "leaving")
    job = httpx.post(f"{api}/generate", json={"prompt": "before the rotation"}, headers=auth(made.key)).json()
    rotated = mediagen(deployment.env, "keys", "rotate", "leaving")
    assert rotated.returncode == 0, rotated.stderr
    found = re.search(r"api key\s+(mg_\S+)", rotated.stdout)
    assert found, rotated.stdout
    new_key = found.group(1)

    deadline = time.monotonic() + 3
    while httpx.get(f"{api}/jobs", headers=auth(made.key)).status_code != 401:
        assert time.monotonic() < deadline, "the old value kept working"
        time.sleep(0.05)
    assert httpx.get(f"{api}/status/{job['job_id']}", headers=auth(new_key)).status_code == 200

    # When the key is revoked while the API has it cached
    assert httpx.get(f"{api}/jobs", headers=auth(new_key)).status_code == 200
    revoked = mediagen(deployment.env, "keys", "revoke", "leaving")
    assert revoked.returncode == 0, revoked.stderr
    revoked_at = time.monotonic()
    # Then it is refused within a second, with no restart
    while httpx.get(f"{api}/jobs", headers=auth(new_key)).status_code != 401:
        assert time.monotonic() - revoked_at < 1.5, "still served more than a second after its revocation"
        time.sleep(0.02)
    assert time.monotonic() - revoked_at <= 1.1
    listed = mediagen(deployment.env, "keys", "list", "--all")
    assert re.search(r"leaving\s.*revoked", listed.stdout), listed.stdout
    again = mediagen(deployment.env, "keys", "revoke", "leaving")
    assert again.returncode == 1 and "no live API key" in again.stderr


def test_the_table_keeps_a_digest_of_each_key_never_the_key(deployment: Deployment) -> None:
    made = create_key(deployment.env, "stored")
    with psycopg.connect(libpq_url(deployment.database_url)) as conn:
        row = conn.execute("SELECT * FROM api_keys WHERE name = 'stored'").fetchone()
    assert row is not None
    assert made.key not in repr(row)
    assert keys.digest(made.key) in row
    taken = mediagen(deployment.env, "keys", "create", "stored")
    assert taken.returncode == 1 and "named 'stored' already" in taken.stderr


class CountingDatabase(Database):
    """The real database, counting the single statements run through it."""

    statements = 0

    async def fetchrow(self, query: str, *args: object) -> Any:
        self.statements += 1
        return await super().fetchrow(query, *args)


async def test_requests_presenting_one_key_at_once_share_one_lookup(deployment: Deployment) -> None:
    db = CountingDatabase(deployment.database_url, pool_size=2)
    keyring = KeyRing([], db)
    try:
        async with db.transaction() as conn:
            issued = await keys.create(conn, "busy")
        owners = await asyncio.gather(*(keyring.owner(f"Bearer {issued.key}") for _ in range(50)))
        assert set(owners) == {issued.record.owner}
        assert db.statements == 1
        await keyring.owner(f"Bearer {issued.key}")
        assert db.statements == 1, "a key looked up less than a second ago costs no statement"
    finally:
        await db.dispose()


async def test_a_key_is_trusted_for_one_second_after_it_is_looked_up(deployment: Deployment) -> None:
    db = Database(deployment.database_url, pool_size=1)
    now = [1000.0]
    keyring = KeyRing([LEGACY], db, clock=lambda: now[0])
    try:
        async with db.transaction() as conn:
            issued = await keys.create(conn, "cached")
        assert await keyring.owner(f"Bearer {issued.key}") == issued.record.owner
        assert await keyring.owner(f"Bearer {LEGACY}") != issued.record.owner  # the setting's key works too
        async with db.transaction() as conn:
            await keys.revoke(conn, "cached")

        now[0] += 0.9
        assert await keyring.owner(f"Bearer {issued.key}") == issued.record.owner
        now[0] += 0.2
        with pytest.raises(Unauthorized):
            await keyring.owner(f"Bearer {issued.key}")

        await keyring.flush()  # its use was recorded, outside any request
        async with db.connect() as conn:
            (listed,) = [k for k in await keys.list_keys(conn, include_revoked=True) if k.name == "cached"]
        assert listed.last_used_at is not None
        assert datetime.now(UTC) - listed.last_used_at < timedelta(minutes=1)
    finally:
        await db.dispose()


async def test_a_delivery_signed_with_two_secrets_verifies_with_either_and_no_other() -> None:
    old, new, other = keys.new_webhook_secret(), keys.new_webhook_secret(), keys.new_webhook_secret()
    sender = WebhookSender(
        None,  # type: ignore[arg-type]
        secret=None,
        public_base_url="",
        allowed_networks=[],
        timeout_seconds=1,
        retry_base_seconds=1,
        retry_cap_seconds=1,
        give_up_seconds=1,
        poll_seconds=1,
    )
    now, payload = datetime.now(UTC), '{"job_id":"x"}'
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(now.timestamp()))}
    headers["webhook-signature"] = sender.sign([new, old], "msg_1", now, payload)
    await sender.client.aclose()

    assert verifies(new, (payload.encode(), headers)) and verifies(old, (payload.encode(), headers))
    assert not verifies(other, (payload.encode(), headers))
