"""API keys as data: the only writer of the `api_keys` table (create, revoke, rotate, webhook secrets,
last use), and the reads the API and the workers make of it.

A key is `mg_` and 32 random bytes (base64url); only its SHA-256 is stored. A fast hash is the right one
here, not bcrypt or argon2: those slow down guessing a *low-entropy* password, while a 256-bit random key
cannot be guessed however fast the hash, and the API looks a key up on every request whose key is not
in its one-second cache, so the lookup must be one indexed equality, not a deliberately slow function.

Each key has its own owner id (`key_<hex>`, what its jobs carry in `jobs.owner`, kept across rotations),
its own limits (NULL: the settings' defaults), and a Standard Webhooks secret (`whsec_...`) that signs
the webhooks of its jobs. Rotating the secret keeps the previous one signing for an overlap, so a
receiver can move to the new one without missing a delivery. Rotating the key itself replaces it at
once: the old value stops working (within the API's cache time), the owner and its jobs stay.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from mediagen.core.db import Database
from mediagen.core.errors import MediagenError

KEY_PREFIX = "mg_"
SHOWN_PREFIX_LENGTH = 10
"""Characters of a key kept in clear (`mg_` and 7 more, 42 bits of its 256) to tell keys apart in a list."""


class KeyNotFound(MediagenError):
    """No live key has that name or id."""


class KeyNameTaken(MediagenError):
    """A live key has that name already (a revoked key's name may be given again)."""


def digest(key: str) -> bytes:
    """What the table stores of a key, and what a presented key is looked up by."""
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class ApiKey:
    id: uuid.UUID
    name: str
    owner: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    rotated_at: datetime | None
    revoked_at: datetime | None
    rate_per_minute: int | None
    max_unfinished_jobs: int | None
    daily_spend_cap_usd: Decimal | None
    previous_webhook_secret_until: datetime | None


@dataclass(frozen=True)
class Issued:
    """A key as made or rotated: `key` (and `webhook_secret`, when one was made) are shown this once."""

    record: ApiKey
    key: str
    webhook_secret: str | None = None


@dataclass(frozen=True)
class Caller:
    """What a request's key resolves to: whose it is and its own limits (None: the default)."""

    id: uuid.UUID
    owner: str
    rate_per_minute: int | None
    max_unfinished_jobs: int | None
    daily_spend_cap_usd: Decimal | None


_COLUMNS = (
    "id, name, owner, prefix, created_at, last_used_at, rotated_at, revoked_at, rate_per_minute, "
    "max_unfinished_jobs, daily_spend_cap_usd, previous_webhook_secret_until"
)


def _record(row: Any) -> ApiKey:
    return ApiKey(**{name: getattr(row, name) for name in ApiKey.__dataclass_fields__})


async def create(
    conn: AsyncConnection,
    name: str,
    *,
    rate_per_minute: int | None = None,
    max_unfinished_jobs: int | None = None,
    daily_spend_cap_usd: Decimal | None = None,
) -> Issued:
    """A new key and its webhook secret; KeyNameTaken when a live key has this name."""
    key_id, key, secret = uuid.uuid4(), new_key(), new_webhook_secret()
    row = (
        await conn.execute(
            text(
                "INSERT INTO api_keys (id, name, owner, key_hash, prefix, rate_per_minute, max_unfinished_jobs, "
                "daily_spend_cap_usd, webhook_secret) VALUES (:id, :name, :owner, :hash, :prefix, :rate, :jobs, "
                f":cap, :secret) ON CONFLICT (name) WHERE revoked_at IS NULL DO NOTHING RETURNING {_COLUMNS}"
            ),
            {
                "id": key_id,
                "name": name,
                "owner": f"key_{key_id.hex}",
                "hash": digest(key),
                "prefix": key[:SHOWN_PREFIX_LENGTH],
                "rate": rate_per_minute,
                "jobs": max_unfinished_jobs,
                "cap": daily_spend_cap_usd,
                "secret": secret,
            },
        )
    ).first()
    if row is None:
        raise KeyNameTaken(f"a live API key is named {name!r} already")
    return Issued(_record(row), key, secret)


async def list_keys(conn: AsyncConnection, *, include_revoked: bool = False) -> list[ApiKey]:
    where = "" if include_revoked else "WHERE revoked_at IS NULL"
    rows = await conn.execute(text(f"SELECT {_COLUMNS} FROM api_keys {where} ORDER BY created_at, id"))
    return [_record(row) for row in rows]


def _which(name_or_id: str) -> tuple[str, dict[str, Any]]:
    """The WHERE that picks a key: by id when the argument is one, else the live key of that name."""
    try:
        return "id = :id", {"id": uuid.UUID(name_or_id)}
    except ValueError:
        return "name = :name AND revoked_at IS NULL", {"name": name_or_id}


async def _update(conn: AsyncConnection, name_or_id: str, assignments: str, values: dict[str, Any]) -> ApiKey:
    where, params = _which(name_or_id)
    row = (
        await conn.execute(
            text(f"UPDATE api_keys SET {assignments} WHERE {where} AND revoked_at IS NULL RETURNING {_COLUMNS}"),
            {**params, **values},
        )
    ).first()
    if row is None:
        raise KeyNotFound(f"no live API key named or with id {name_or_id!r}")
    return _record(row)


async def revoke(conn: AsyncConnection, name_or_id: str) -> ApiKey:
    """The key stops working (within the API's cache time, a second); its jobs and usage stay."""
    return await _update(conn, name_or_id, "revoked_at = now()", {})


async def rotate(conn: AsyncConnection, name_or_id: str) -> Issued:
    """A new value for the key; the old one stops working at once (no overlap: a leaked key is the
    usual reason). The owner, limits, webhook secret and jobs stay."""
    key = new_key()
    record = await _update(
        conn,
        name_or_id,
        "key_hash = :hash, prefix = :prefix, rotated_at = now()",
        {"hash": digest(key), "prefix": key[:SHOWN_PREFIX_LENGTH]},
    )
    return Issued(record, key)


async def rotate_webhook_secret(conn: AsyncConnection, name_or_id: str, *, overlap: timedelta) -> Issued:
    """A new webhook secret; the current one keeps signing too (both signatures in one header) for
    `overlap`, while the receiver moves over. `key` of the answer is empty: the API key is unchanged."""
    secret = new_webhook_secret()
    record = await _update(
        conn,
        name_or_id,
        "previous_webhook_secret = webhook_secret, webhook_secret = :secret, "
        "previous_webhook_secret_until = now() + make_interval(secs => :overlap)",
        {"secret": secret, "overlap": overlap.total_seconds()},
    )
    return Issued(record, "", secret)


# --- the API's and the workers' reads (single statements on the lean pool) -----------------------------

_RESOLVE_SQL = (
    "SELECT id, owner, rate_per_minute, max_unfinished_jobs, daily_spend_cap_usd FROM api_keys "
    "WHERE key_hash = $1 AND revoked_at IS NULL"
)


async def resolve(db: Database, key_digest: bytes) -> Caller | None:
    """The live key with this digest (one unique-index lookup), or None."""
    row = await db.fetchrow(_RESOLVE_SQL, key_digest)
    if row is None:
        return None
    return Caller(
        row["id"], row["owner"], row["rate_per_minute"], row["max_unfinished_jobs"], row["daily_spend_cap_usd"]
    )


async def any_issued(db: Database) -> bool:
    """Has any key ever been made (revoked ones count: revoking the last key must not open the API)?"""
    return bool(await db.fetchval("SELECT EXISTS (SELECT 1 FROM api_keys)"))


async def touch(db: Database, key_ids: Collection[uuid.UUID]) -> None:
    """Record that these keys were used just now; a key written less than a minute ago is left as is
    (several API processes flush the same key)."""
    if key_ids:
        await db.execute(
            "UPDATE api_keys SET last_used_at = now() WHERE id = ANY($1::uuid[]) "
            "AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
            list(key_ids),
        )


async def signing_secrets(db: Database, owners: Sequence[str]) -> dict[str, list[str]]:
    """owner -> the webhook secrets its deliveries are signed with now (the current one first, then the
    previous one during its overlap). Owners without a key of the table (the anonymous caller, keys of
    MEDIAGEN_API_KEYS) are absent: their deliveries are signed with MEDIAGEN_WEBHOOK_SECRET."""
    if not owners:
        return {}
    rows = await db.fetch(
        "SELECT owner, webhook_secret, CASE WHEN previous_webhook_secret_until > now() "
        "THEN previous_webhook_secret END AS previous FROM api_keys WHERE owner = ANY($1::text[])",
        list(set(owners)),
    )
    return {row["owner"]: [row["webhook_secret"], *([row["previous"]] if row["previous"] else [])] for row in rows}
