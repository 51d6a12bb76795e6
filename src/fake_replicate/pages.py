"""The list endpoint's pages, as Replicate's: newest first, ``list_page_size`` (100) a page, opaque cursors.

Replicate pages with cursors: ``next`` and ``previous`` are absolute URLs whose ``cursor`` is the base64
of a small query string holding a position (its API reference shows ``p=<created_at>``) and, going back,
a direction. A cursor
is a position, not an offset, so predictions created while a client walks the pages do not shift them:
nothing is seen twice or skipped. Here the position is a prediction's index in creation order:

- no cursor: the newest page; ``previous`` is null;
- ``p=K``: the page just older than index K (the ``next`` of a page whose oldest is K);
- ``r=1&p=K``: the page from index K up (the ``previous`` of a page whose newest is K - 1).

A page has a ``next`` while older predictions exist, and a ``previous`` while newer ones do.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode


@dataclass(frozen=True)
class Page:
    """Indexes ``start`` (oldest, included) to ``end`` (newest, excluded) of the creation order, and the
    cursors of its neighbours (None when there is none)."""

    start: int
    end: int
    next: str | None
    previous: str | None


def encode(position: int, *, reverse: bool) -> str:
    query = urlencode({"r": 1, "p": position} if reverse else {"p": position})
    return base64.b64encode(query.encode()).decode()


def decode(cursor: str) -> tuple[int, bool] | None:
    """(position, reverse) of a cursor, or None when it is not one of ours."""
    try:
        fields = parse_qs(base64.b64decode(cursor, validate=True).decode(), strict_parsing=True)
        position = int(fields["p"][0])
        reverse = fields.get("r", ["0"])[0] == "1"
    except (binascii.Error, UnicodeDecodeError, ValueError, KeyError):
        return None
    return (position, reverse) if position >= 0 else None


def page_of(total: int, size: int, cursor: str | None) -> Page | None:
    """The page ``cursor`` points at among ``total`` predictions, or None for a cursor not ours."""
    if cursor is None:
        position, reverse = total, False
    else:
        decoded = decode(cursor)
        if decoded is None:
            return None
        position, reverse = decoded
    if reverse:
        start = min(position, total)
        end = min(total, start + size)
    else:
        end = min(position, total)
        start = max(0, end - size)
    older = encode(start, reverse=False) if start > 0 else None
    newer = encode(end, reverse=True) if end < total else None
    return Page(start, end, older, newer)
