"""Schema changes that let the service run on: index builds `CONCURRENTLY`, outside any transaction.

For revisions (env.py puts this folder on the path): `create_index_concurrently` and
`drop_index_concurrently` instead of `op.create_index` / `op.drop_index` on a table that already has
rows. A table the same revision creates needs neither: nobody uses it yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alembic import context, op
from sqlalchemy import text


@contextmanager
def _lock_timeout_off() -> Iterator[None]:
    """A concurrent build waits for the transactions open when it began, and that wait blocks no
    request (its SHARE UPDATE EXCLUSIVE lets reads and writes through): lock_timeout is not for it.
    The migration's own value is kept in a session variable and put back after."""
    op.execute("SELECT set_config('mediagen.lock_timeout', current_setting('lock_timeout'), false)")
    op.execute("SET lock_timeout = 0")
    try:
        yield
    finally:
        op.execute("SELECT set_config('lock_timeout', current_setting('mediagen.lock_timeout'), false)")


def create_index_concurrently(name: str, table: str, definition: str) -> None:
    """`CREATE INDEX CONCURRENTLY IF NOT EXISTS name ON table definition` (`definition`: "(column, ...)"
    and any WHERE). A build that failed half-way left an INVALID index of that name: dropped first."""
    with op.get_context().autocommit_block(), _lock_timeout_off():
        if not context.is_offline_mode():
            invalid = op.get_bind().execute(
                text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"), {"name": name}
            )
            if invalid.scalar():
                op.execute(f"DROP INDEX CONCURRENTLY {name}")
        op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} {definition}")


def drop_index_concurrently(name: str) -> None:
    with op.get_context().autocommit_block(), _lock_timeout_off():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
