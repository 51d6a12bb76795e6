"""Webhooks to clients: signed per Standard Webhooks, at least once, retried, recorded, never aimed inward."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from conftest import Process, kill_group, start_api, start_worker, stop, unique, wait_http
from mediagen.core.db import Database
from mediagen.core.deliveries import Due, networks, refusal
from mediagen.worker.delivery_sender import RESOLVER_THREADS, Refused, WebhookSender, body

SECRET = "whsec_" + base64.b64encode(b"mediagen-test-webhook-secret-32b").decode()


@dataclass
class Receiver:
    """A client's webhook endpoint: verifies every delivery with the standardwebhooks library."""

    url: str
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    forged: int = 0
    answers: dict[str, list[int]] = field(default_factory=dict)
    """path -> status codes to answer with, one per request, then 200."""
    hold: dict[str, threading.Event] = field(default_factory=dict)
    """path -> an event the first request on that path waits for before answering."""
    seen: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> list[dict[str, Any]]:
        with self.seen:
            if not self.seen.wait_for(lambda: predicate(self.deliveries), timeout):
                raise AssertionError(f"not received in {timeout}s: {self.deliveries}")
            return list(self.deliveries)

    def on(self, path: str) -> list[dict[str, Any]]:
        return [d for d in self.deliveries if d["path"] == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    verifier = Webhook(SECRET)
    server: ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state: Receiver = server.receiver  # type: ignore[attr-defined]
            body = self.rfile.read(int(self.headers["Content-Length"]))
            try:
                payload = verifier.verify(body, {k.lower(): v for k, v in self.headers.items()})
            except Exception:
                with state.seen:
                    state.forged += 1
                self.send_response(400)
                self.end_headers()
                return
            held = state.hold.pop(self.path, None)
            if held is not None:
                held.wait(30)
            codes = state.answers.get(self.path) or []
            code = codes.pop(0) if codes else 200
            with state.seen:
                state.deliveries.append({"path": self.path, "id": self.headers["webhook-id"], "code": code, **payload})
                state.seen.notify_all()
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state = Receiver(f"http://127.0.0.1:{server.server_address[1]}")
    server.receiver = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()


HOOKED = {
    "MEDIAGEN_WEBHOOK_SECRET": SECRET,
    "MEDIAGEN_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    "MEDIAGEN_WEBHOOK_TIMEOUT_SECONDS": "1",
    "MEDIAGEN_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
    "MEDIAGEN_WEBHOOK_POLL_SECONDS": "0.1",
}


@pytest.fixture(scope="module")
def hooked(service_env: dict[str, str], workdir: Path) -> Iterator[tuple[str, list[Process]]]:
    """An API and a worker that send webhooks (beside the session's, on the same database and queue)."""
    api = start_api(service_env, workdir / "api-webhooks.log", **HOOKED)
    workers = [start_worker(service_env, workdir / "worker-webhooks.log", **HOOKED)]
    yield api.extra["url"], workers
    stop(api.proc)
    for worker in workers:
        stop(worker.proc, timeout=40)


def generate(api_url: str, prompt: str, **fields: Any) -> str:
    answer = httpx.post(f"{api_url}/generate", json={"prompt": unique(prompt), **fields})
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["job_id"]
    return job_id


def test_a_receiver_gets_signed_deliveries_of_the_events_it_asked_for(
    hooked: tuple[str, list[Process]], receiver: Receiver, service_env: dict[str, str]
) -> None:
    receiver.answers["/flaky"] = [500]  # the first delivery fails, and is tried again
    job_id = generate(
        hooked[0], "a signed lighthouse", webhook_url=f"{receiver.url}/flaky", webhook_events=["running", "succeeded"]
    )

    got = receiver.wait_for(lambda ds: any(d["path"] == "/flaky" and d["status"] == "succeeded" for d in ds))

    mine = [d for d in got if d["job_id"] == job_id]
    assert {d["event"] for d in mine} == {"running", "succeeded"}
    done = next(d for d in mine if d["event"] == "succeeded")
    assert done["result_urls"] and done["result_urls"][0].endswith(".png")
    assert done["progress"] == 1.0
    status = httpx.get(f"{hooked[0]}/status/{job_id}").json()
    assert {k: v for k, v in done.items() if k not in ("path", "id", "code", "event")} == status, (
        "the body is the status object GET /status answers"
    )
    assert receiver.forged == 0
    assert [d["code"] for d in mine].count(500) == 1
    first = mine[0]
    assert [d["id"] for d in mine].count(first["id"]) == 2, "a retry carries the same webhook-id"
    detail = receiver_view(hooked[0], job_id, lambda ds: all(d["state"] == "delivered" for d in ds) and len(ds) == 2)
    retried = next(d for d in detail if d["id"] == first["id"])
    assert [t["status_code"] for t in retried["history"]] == [500, 200]
    assert retried["history"][0]["error"] == "HTTP 500" and retried["history"][0]["next_try_at"]
    told = subprocess.run(
        [sys.executable, "-m", "mediagen.cli", "job", job_id],
        env=service_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"webhook {first['id']} {first['event']:<9} delivered after 2 tries" in told.stdout, told.stdout
    assert "HTTP 500" in told.stdout and "next try" in told.stdout


def receiver_view(api_url: str, job_id: str, done: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        deliveries: list[dict[str, Any]] = httpx.get(f"{api_url}/jobs/{job_id}").json()["webhook_deliveries"]
        if done(deliveries) or time.monotonic() > deadline:
            return deliveries
        time.sleep(0.1)


def test_terminal_events_are_the_default(hooked: tuple[str, list[Process]], receiver: Receiver) -> None:
    job_id = generate(hooked[0], "a default lighthouse", webhook_url=f"{receiver.url}/default")

    receiver.wait_for(lambda ds: any(d["path"] == "/default" and d["job_id"] == job_id for d in ds))
    time.sleep(0.5)

    assert [d["event"] for d in receiver.on("/default") if d["job_id"] == job_id] == ["succeeded"]


def test_a_worker_killed_mid_delivery_loses_none(
    hooked: tuple[str, list[Process]], receiver: Receiver, service_env: dict[str, str], workdir: Path
) -> None:
    api_url, workers = hooked
    held = threading.Event()
    receiver.hold["/held"] = held
    job_id = generate(api_url, "a lighthouse in a storm", webhook_url=f"{receiver.url}/held")
    deadline = time.monotonic() + 15
    while not any(d["state"] == "pending" and d["tries"] for d in receiver_view(api_url, job_id, bool, 0)):
        assert time.monotonic() < deadline, "the delivery was never tried"
        time.sleep(0.05)

    kill_group(workers[0].proc, signal.SIGKILL)  # while the receiver holds the request
    held.set()
    workers[0] = start_worker(service_env, workdir / "worker-webhooks.log", **HOOKED)

    got = receiver.wait_for(lambda ds: any(d["path"] == "/held" and d["code"] == 200 for d in ds))
    assert {d["id"] for d in got if d["path"] == "/held"} == {d["id"] for d in receiver.on("/held")}
    deliveries = receiver_view(api_url, job_id, lambda ds: ds and ds[0]["state"] == "delivered")
    assert deliveries[0]["state"] == "delivered"
    assert deliveries[0]["tries"] >= 2


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest",
        "http://10.1.2.3/hook",
        "http://[::1]:8080/",
        "ftp://example.com/",
        "http://a..b/",
        "http://-a.example.com/",
        "http://[::7f00:1]/",
        "http://[64:ff9b::7f00:1]/",
        "http://[2002:7f00:1::]/",
    ],
)
def test_a_webhook_aimed_at_an_inner_address_is_refused_at_submit(hooked: tuple[str, list[Process]], url: str) -> None:
    answer = httpx.post(f"{hooked[0]}/generate", json={"prompt": "x", "webhook_url": url})
    assert answer.status_code == 422
    assert answer.json()["detail"]["fields"][0]["field"] == "webhook_url"


async def test_a_delivery_to_a_host_the_resolver_cannot_take_is_given_up_and_recorded(
    hooked: tuple[str, list[Process]], receiver: Receiver, db: Database
) -> None:
    """A URL stored before hosts were checked at submit (`a..b`): given up once, with the reason, not
    claimed again every few seconds."""
    job_id = generate(hooked[0], "a lighthouse nowhere", webhook_url=f"{receiver.url}/nowhere")
    await db.execute("UPDATE job_webhooks SET url = $1 WHERE job_id = $2", "http://a..b/", uuid.UUID(job_id))

    deliveries = await asyncio.to_thread(
        receiver_view, hooked[0], job_id, lambda ds: ds and ds[0]["state"] != "pending", 15.0
    )

    assert [(d["state"], d["tries"]) for d in deliveries] == [("failed", 1)], deliveries
    assert deliveries[0]["history"][0]["error"].startswith("refused: cannot resolve a..b: UnicodeError")
    assert deliveries[0]["history"][0]["next_try_at"] is None
    assert not receiver.on("/nowhere")


def test_without_a_signing_secret_webhooks_are_refused(api_url: str) -> None:
    answer = httpx.post(f"{api_url}/generate", json={"prompt": "x", "webhook_url": "https://example.com/hook"})
    assert answer.status_code == 422
    assert "MEDIAGEN_WEBHOOK_SECRET" in answer.json()["detail"]["message"]


def test_a_delivery_carries_the_job_as_it_was_at_its_event() -> None:
    """The body is the status object (error only once ended, progress only while running, waiting_for null:
    no event comes while a job waits on the provider) and the event, byte for byte."""
    job_id = uuid.UUID("00000000-0000-4000-8000-000000000001")
    when = datetime(2026, 1, 1, tzinfo=UTC)
    retrying = Due(1, job_id, "", "retrying", "http://x", 1, when, "retrying", 2, "HTTP 503", 0.5, [])
    failed = Due(2, job_id, "", "failed", "http://x", 1, when, "failed", 3, "HTTP 503", None, [])

    assert body(retrying, []) == (
        '{"job_id":"00000000-0000-4000-8000-000000000001","status":"retrying","attempts":2,"error":null,'
        '"result_urls":[],"progress":null,"waiting_for":null,"queue_position":null,"event":"retrying"}'
    )
    assert json.loads(body(failed, []))["error"] == "HTTP 503"
    assert json.loads(body(failed, ["/media/a/0.png"]))["result_urls"] == ["/media/a/0.png"]


def test_only_public_addresses_are_reachable_unless_allowed() -> None:
    assert refusal("169.254.169.254", []) == "169.254.169.254 is a cloud metadata address"
    for inner in ("127.0.0.1", "10.0.0.8", "192.168.1.1", "172.16.0.1", "fe80::1", "::1", "100.64.0.1", "0.0.0.0"):
        assert refusal(inner, []) is not None, inner
    assert refusal("::ffff:127.0.0.1", []) is not None
    assert refusal("93.184.215.14", []) is None
    assert refusal("127.0.0.1", networks(["127.0.0.0/8"])) is None


def test_ipv6_forms_that_embed_an_ipv4_address_are_refused() -> None:
    assert refusal("::7f00:1", []) == "::7f00:1 is an IPv4-compatible address (127.0.0.1 is a loopback address)"
    assert refusal("64:ff9b::a00:8", []) == "64:ff9b::a00:8 is a NAT64 address (10.0.0.8 is a private address)"
    assert refusal("2002:7f00:1::", []) == "2002:7f00:1:: is a 6to4 address (127.0.0.1 is a loopback address)"
    for public_inside in ("::808:808", "64:ff9b::808:808", "64:ff9b:1::808:808", "2002:808:808::1"):
        assert refusal(public_inside, []) is not None, public_inside
    assert refusal("::7f00:1", networks(["127.0.0.0/8"])) is not None, "allowing 127/8 does not allow ::/96"
    assert refusal("64:ff9b::808:808", networks(["64:ff9b::/96"])) is None, "unless allowed as such"


def _sender(timeout_seconds: float = 1) -> WebhookSender:
    return WebhookSender(
        None,  # type: ignore[arg-type]
        secret=SECRET,
        public_base_url="",
        allowed_networks=[],
        timeout_seconds=timeout_seconds,
        retry_base_seconds=1,
        retry_cap_seconds=1,
        give_up_seconds=1,
        poll_seconds=1,
    )


async def test_a_host_name_is_checked_by_what_it_resolves_to() -> None:
    sender = _sender()
    try:
        with pytest.raises(Refused, match="loopback"):
            await sender._address("localhost", 80)
    finally:
        await sender.stop()


async def test_a_host_name_the_resolver_cannot_take_gives_the_delivery_up() -> None:
    """`a..b` makes the resolver raise UnicodeError, not gaierror: refused (given up), not left unrecorded."""
    sender = _sender()
    try:
        with pytest.raises(Refused, match=r"cannot resolve a\.\.b: UnicodeError"):
            await sender._address("a..b", 80)
    finally:
        await sender.stop()


async def test_a_slow_resolution_times_out_and_holds_only_the_resolver_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    def slow_getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        with lock:
            running[0] += 1
            running[1] = max(running)
        release.wait(10)
        with lock:
            running[0] -= 1
        raise socket.gaierror(socket.EAI_NONAME, "released")

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    sender = _sender(timeout_seconds=0.2)
    try:
        started = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*(sender._address(f"slow{n}.example", 80) for n in range(12)), return_exceptions=True), 5
        )
        took = time.monotonic() - started
    finally:
        release.set()
        await sender.stop()

    assert all(isinstance(result, TimeoutError) for result in results), results
    assert took < 1.5, took
    assert running[1] <= RESOLVER_THREADS, f"{running[1]} threads held by slow lookups"


def test_the_receiver_refuses_a_forged_signature(receiver: Receiver) -> None:
    body = json.dumps({"job_id": "x"})
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1,Zm9yZ2Vk"}
    before = receiver.forged
    assert httpx.post(f"{receiver.url}/default", content=body, headers=headers).status_code == 400
    assert receiver.forged == before + 1


_ = wait_http  # the receiver is up as soon as its socket is bound
