"""Sends clients' webhooks: signed (Standard Webhooks), at least once, retried for about a day.

Each delivery is signed with the webhook secrets of the key that made its job (mediagen.core.keys: the
current one, and during a rotation's overlap the previous one too, both signatures in one
`webhook-signature` header, as Standard Webhooks allows), so one tenant cannot forge another's
webhooks; a job of no such key (anonymous, or a key of MEDIAGEN_API_KEYS) with MEDIAGEN_WEBHOOK_SECRET.

Every worker process runs a `WebhookSender`: every `webhook_poll_seconds` it takes the due deliveries
(mediagen.core.deliveries), POSTs each, and records the try. A delivery that fails is due again after
`min(cap, base * 2^(tries-1))` seconds, half of it jittered, until `webhook_give_up_seconds` after its
event; one refused for where it points (below) is given up at once.

Where a webhook may go (SSRF): the host is resolved first, and every address it resolves to must be
public, unless in `MEDIAGEN_WEBHOOK_ALLOWED_NETWORKS`; the request then goes to that very address
(no second lookup an attacker could answer differently). Redirects are not followed, timeouts are
short, and at most 64 KiB of the answer is read.

Resolving runs on a pool of its own of `RESOLVER_THREADS` threads, under the try's timeout: a name
that resolves slowly holds at most those threads (a thread cannot be stopped mid-lookup), never the
loop's default executor, and a lookup still queued when its try times out is dropped. A name the
resolver refuses (malformed, or unknown) gives the delivery up at once with the resolver's reason; a
temporary resolver failure (EAI_AGAIN) or a lookup timeout is retried like a lost connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from mediagen.core import deliveries, jobs, keys
from mediagen.core.db import Database
from mediagen.core.retry import RetryPolicy
from mediagen.logging import log_event
from mediagen.worker.background import Background

MAX_ANSWER_BYTES = 64 * 1024
RESOLVER_THREADS = 4


def body(due: deliveries.Due, urls: list[str]) -> str:
    """What a delivery POSTs: the job's status object as `GET /status/{id}` answers it (as the job was at
    the event, by the rules of mediagen.core.jobs.status), and the event."""
    return orjson.dumps(
        {
            "job_id": str(due.job_id),
            "status": due.job_status,
            "attempts": due.job_attempts,
            "error": jobs.shown_error(due.job_status, due.job_error),
            "result_urls": urls,
            "progress": jobs.shown_progress(due.job_status, due.job_progress),
            # An event is a change of status or of progress: at either the job waits for nothing else (a
            # claim clears `waiting_for`, and progress moves only once the provider answers again).
            "waiting_for": None,
            "queue_position": None,
            "event": due.event,
        }
    ).decode()


class Refused(Exception):
    """The webhook points somewhere it may not go: retrying cannot help."""


class WebhookSender(Background):
    name = "webhook-sender"

    def __init__(
        self,
        db: Database,
        *,
        secret: str | None,
        public_base_url: str,
        allowed_networks: list[str],
        timeout_seconds: float,
        retry_base_seconds: float,
        retry_cap_seconds: float,
        give_up_seconds: float,
        poll_seconds: float,
        batch: int = 50,
    ) -> None:
        self.db = db
        self.secret = secret
        self._signers: dict[str, Webhook] = {}
        self.public_base_url = public_base_url
        self.allowed = deliveries.networks(allowed_networks)
        self.timeout = timeout_seconds
        # The same capped, jittered backoff as job attempts: one policy (mediagen.core.retry).
        self.backoff = RetryPolicy(base_seconds=retry_base_seconds, cap_seconds=retry_cap_seconds).backoff
        self.give_up = give_up_seconds
        self.poll = poll_seconds
        self.batch = batch
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 3.0)),
            trust_env=False,
            headers={"User-Agent": "mediagen-webhooks"},
        )
        self._resolver = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="webhook-resolver")

    async def stop(self) -> None:
        await super().stop()
        await self.client.aclose()
        self._resolver.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            try:
                sent = await self.send_due()
            except Exception:
                log_event("webhook.sender.failed", logging.WARNING, exc_info=True)
                sent = 0
            if sent < self.batch:
                await asyncio.sleep(self.poll)

    async def send_due(self) -> int:
        """Send every delivery due now (one batch); how many were tried."""
        # Held for twice a try's own time limit: a delivery whose worker died is due again after that.
        due = await deliveries.claim_due(self.db, batch=self.batch, lease_seconds=2 * self.timeout + 1)
        if due:
            owned = await keys.signing_secrets(self.db, [delivery.owner for delivery in due if delivery.owner])
            fallback = [self.secret] if self.secret else []
            await asyncio.gather(*(self._deliver(delivery, owned.get(delivery.owner, fallback)) for delivery in due))
        return len(due)

    def sign(self, secrets: list[str], msg_id: str, when: datetime, payload: str) -> str:
        """The `webhook-signature` header: one `v1,...` signature per secret, space-separated."""
        signatures = []
        for secret in secrets:
            signer = self._signers.get(secret)
            if signer is None:
                signer = self._signers[secret] = Webhook(secret)
            signatures.append(signer.sign(msg_id, when, payload))
        return " ".join(signatures)

    async def _deliver(self, due: deliveries.Due, secrets: list[str]) -> None:
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        retry = True
        try:
            if not secrets:
                raise Refused("no secret signs it (MEDIAGEN_WEBHOOK_SECRET is not set, and its key has none)")
            async with asyncio.timeout(2 * self.timeout):
                status_code = await self._post(due, secrets)
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}" + (" (redirects are not followed)" if 300 <= status_code < 400 else "")
        except Refused as refused:
            error, retry = f"refused: {refused}", False
        except (httpx.HTTPError, OSError, TimeoutError) as failure:
            error = f"{type(failure).__name__}: {failure}".rstrip(": ")
        delivered = error is None
        retry_in = self._next_try(due) if not delivered and retry else None
        await deliveries.record_try(
            self.db,
            due.id,
            delivered=delivered,
            status_code=status_code,
            error=error,
            milliseconds=int((time.monotonic() - started) * 1000),
            retry_in=retry_in,
        )
        fields: dict[str, Any] = {
            "job_id": str(due.job_id),
            "webhook_id": deliveries.message_id(due.id),
            "event": due.event,
        }
        if delivered:
            log_event("webhook.delivered", tries=due.tries, status_code=status_code, **fields)
        else:
            log_event(
                "webhook.failed" if retry_in is not None else "webhook.given_up",
                logging.WARNING,
                tries=due.tries,
                status_code=status_code,
                error=error,
                retry_in=retry_in,
                **fields,
            )

    def _next_try(self, due: deliveries.Due) -> float | None:
        delay = self.backoff(due.tries)
        age = (datetime.now(UTC) - due.created_at).total_seconds()
        return None if age + delay > self.give_up else delay

    async def _post(self, due: deliveries.Due, secrets: list[str]) -> int:
        urls = [f"{self.public_base_url}/media/{key}" for key in due.output_keys]
        payload = body(due, urls)
        msg_id = deliveries.message_id(due.id)
        now = datetime.now(UTC)
        parts = urlsplit(due.url)
        host = parts.hostname or ""
        address = await self._address(host, parts.port or (443 if parts.scheme == "https" else 80))
        netloc = f"[{address}]" if ":" in address else address
        if parts.port:
            netloc += f":{parts.port}"
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        headers = {
            "Host": parts.netloc.rpartition("@")[2],
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.sign(secrets, msg_id, now, payload),
        }
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        request = self.client.build_request("POST", target, content=payload, headers=headers, extensions=extensions)
        response = await self.client.send(request, stream=True)
        try:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read >= MAX_ANSWER_BYTES:
                    break
        finally:
            await response.aclose()
        return response.status_code

    async def _address(self, host: str, port: int) -> str:
        """The address to connect to: every address `host` resolves to must be allowed."""
        lookup = asyncio.get_running_loop().run_in_executor(
            self._resolver, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM
        )
        try:
            async with asyncio.timeout(self.timeout):
                found = await lookup
        except TimeoutError:
            raise TimeoutError(f"resolving {host} took over {self.timeout:g}s") from None
        except socket.gaierror as error:
            if error.errno == socket.EAI_AGAIN:
                raise OSError(f"cannot resolve {host} now: {error}") from None
            raise Refused(f"cannot resolve {host}: {error}") from None
        except (UnicodeError, ValueError, OSError) as error:  # `a..b`: UnicodeError, not gaierror
            raise Refused(f"cannot resolve {host}: {type(error).__name__}: {error}") from None
        addresses = [str(info[4][0]) for info in found]
        for address in addresses:
            reason = deliveries.refusal(address, self.allowed)
            if reason is not None:
                raise Refused(f"{host} resolves to {reason}")
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        return addresses[0]
