"""The cursor of `GET /jobs`: where the previous page ended, `(created_at, id)`, opaque to clients."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime


def encode(created_at: datetime, job_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{job_id}".encode()).decode()


def decode(cursor: str) -> tuple[datetime, uuid.UUID] | None:
    """The position a cursor of `encode` names, or None for anything else."""
    try:
        created, _, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
