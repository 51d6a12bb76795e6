"""Webhooks to clients: which events a job sends where, the durable record of every delivery and try,
and where a webhook may go (no inner address: SSRF).

A job's events become `webhook_deliveries` rows inside the transaction that changed the job (a
trigger on `jobs`, see the migration), so none is lost between a commit and a send. Workers take
due deliveries with `FOR UPDATE SKIP LOCKED` and push them `lease` seconds ahead while they send:
a worker that dies mid-delivery leaves its deliveries due again once that lease ends (at least once).
Each try is appended to the delivery's `history`: when, the HTTP status, the error, the next try.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from mediagen.core.db import Database
from mediagen.core.models import WebhookDelivery

EVENTS = ("running", "progress", "retrying", "succeeded", "failed", "canceled")
DEFAULT_EVENTS = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Subscription:
    job_id: uuid.UUID
    url: str
    events: tuple[str, ...]


async def subscribe(conn: AsyncConnection, subscriptions: Sequence[Subscription]) -> None:
    """Record where the events of new jobs go (in the transaction that creates the jobs)."""
    await conn.execute(
        text(
            "INSERT INTO job_webhooks (job_id, url, events) "
            "SELECT s.job_id, s.url, string_to_array(s.events, ',') "
            "FROM unnest(CAST(:ids AS uuid[]), CAST(:urls AS text[]), CAST(:events AS text[])) "
            "AS s(job_id, url, events)"
        ),
        {
            "ids": [s.job_id for s in subscriptions],
            "urls": [s.url for s in subscriptions],
            "events": [",".join(s.events) for s in subscriptions],
        },
    )


@dataclass(frozen=True)
class Due:
    """A delivery to send now: its event, the job as it was then, where to, and its outputs."""

    id: int
    job_id: uuid.UUID
    owner: str
    """The job's owner: whose webhook secrets sign it (mediagen.core.keys.signing_secrets)."""
    event: str
    url: str
    tries: int
    created_at: datetime
    job_status: str
    job_attempts: int
    job_error: str | None
    job_progress: float | None
    output_keys: list[str]


_CLAIM_DUE_SQL = """
    WITH due AS (
        SELECT id FROM webhook_deliveries
        WHERE state = 'pending' AND next_attempt_at <= now()
        ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED
    )
    UPDATE webhook_deliveries d SET next_attempt_at = now() + make_interval(secs => $2), tries = d.tries + 1
    FROM due, job_webhooks w, jobs j
    WHERE d.id = due.id AND w.job_id = d.job_id AND j.id = d.job_id
    RETURNING d.id, d.job_id, j.owner, d.event, w.url, d.tries, d.created_at, d.job_status, d.job_attempts, d.job_error,
              d.job_progress,
              CASE WHEN d.job_status = 'succeeded' THEN
                ARRAY(SELECT o.storage_key FROM outputs o WHERE o.job_id = d.job_id ORDER BY o.index)
              END AS output_keys
"""


async def claim_due(db: Database, *, batch: int, lease_seconds: float) -> list[Due]:
    """Take up to `batch` due deliveries for `lease_seconds` (they come back if we die meanwhile)."""
    rows = await db.fetch(_CLAIM_DUE_SQL, batch, float(lease_seconds))
    return [
        Due(
            id=row["id"],
            job_id=row["job_id"],
            owner=row["owner"],
            event=row["event"],
            url=row["url"],
            tries=row["tries"],
            created_at=row["created_at"],
            job_status=row["job_status"],
            job_attempts=row["job_attempts"],
            job_error=row["job_error"],
            job_progress=row["job_progress"],
            output_keys=list(row["output_keys"] or []),
        )
        for row in rows
    ]


_RECORD_SQL = """
    UPDATE webhook_deliveries SET
        state = CASE WHEN $2 THEN 'delivered' WHEN $3::float8 IS NULL THEN 'failed' ELSE 'pending' END,
        next_attempt_at = CASE WHEN $2 OR $3::float8 IS NULL THEN NULL
                               ELSE now() + make_interval(secs => $3::float8) END,
        finished_at = CASE WHEN $2 OR $3::float8 IS NULL THEN now() END,
        history = history || jsonb_build_array(jsonb_build_object(
            'try', tries, 'at', now(), 'status_code', $4::int, 'error', $5::text, 'ms', $6::int,
            'next_try_at', CASE WHEN $2 OR $3::float8 IS NULL THEN NULL
                                ELSE now() + make_interval(secs => $3::float8) END))
    WHERE id = $1 AND state = 'pending'
"""


async def record_try(
    db: Database,
    delivery_id: int,
    *,
    delivered: bool,
    status_code: int | None,
    error: str | None,
    milliseconds: int,
    retry_in: float | None,
) -> None:
    """One try's outcome: delivered, or failed and due again in `retry_in` s (None: given up)."""
    await db.execute(
        _RECORD_SQL,
        delivery_id,
        delivered,
        None if delivered or retry_in is None else float(retry_in),
        status_code,
        error,
        milliseconds,
    )


async def for_job(conn: AsyncConnection, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every delivery of a job, oldest first, with its tries (for GET /jobs/{id} and `mediagen job`)."""
    rows = await conn.execute(
        select(WebhookDelivery.__table__).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)
    )
    return [
        {
            "id": f"msg_{row.id}",
            "event": row.event,
            "state": row.state,
            "tries": row.tries,
            "created_at": row.created_at,
            "finished_at": row.finished_at,
            "next_attempt_at": row.next_attempt_at if row.state == "pending" else None,
            "history": row.history,
        }
        for row in rows
    ]


def message_id(delivery_id: int) -> str:
    """The `webhook-id`: one per delivery, the same on every retry (receivers deduplicate on it)."""
    return f"msg_{delivery_id}"


# --- where a webhook may go ---------------------------------------------------------------------------

_METADATA = (ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("fd00:ec2::254/128"))
# IPv6 forms that carry an IPv4 address inside, and may lead to it: refused unless allowed as such.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated (RFC 4291); holds :: and ::1 too


def refusal(address: str, allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """Why a webhook may not reach `address` (an IP), or None. Only public addresses may be reached,
    plus networks a setting allows (`MEDIAGEN_WEBHOOK_ALLOWED_NETWORKS`). IPv4-compatible (`::a.b.c.d`),
    NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`) and 6to4 (`2002::/16`) addresses are refused, naming the
    IPv4 address they embed when that one is itself refused."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in allowed):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        form, embedded = _embedded(ip)
        if form is not None and embedded is not None:
            inner = refusal(str(embedded), allowed)
            return f"{ip} is {form} address" + (f" ({inner})" if inner is not None else "")
    if any(ip in network for network in _METADATA):
        return f"{ip} is a cloud metadata address"
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_private:
        return f"{ip} is a private address"
    if not ip.is_global or ip.is_multicast:
        return f"{ip} is not a public address"
    return None


def _embedded(ip: ipaddress.IPv6Address) -> tuple[str | None, ipaddress.IPv4Address | None]:
    """The IPv6 form that embeds an IPv4 address, and that address (or None, None)."""
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are refused as unspecified and loopback
        return "an IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in network for network in _NAT64):
        return "a NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIXTOFOUR:
        return "a 6to4", ip.sixtofour
    return None, None


def url_refusal(url: str, allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """Why a webhook may not go to `url`, as far as the URL itself tells: a host that is an address
    `refusal` refuses. (A host name is resolved, and each address checked, when a delivery is sent.)"""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return refusal(host, allowed)


def networks(cidrs: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]
