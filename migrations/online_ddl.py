"""Schema changes that let the service run on: index builds `CONCURRENTLY`, outside any transaction.

For revisions (env.py puts this folder on the path): `create_index_concurrently` and
`drop_index_concurrently` instead of `op.create_index` / `op.drop_index` on a table that already has
rows. A table the same revision creates needs neither: nobody uses it yet.

`alter_table_alone` changes one busy table in a transaction of its own. The service's transactions
take `jobs` and `attempts` in both orders (a claim writes the job, then its attempt; a finish the
attempt, then the job), so a revision that held `ACCESS EXCLUSIVE` on one of them while it waited for
the other would deadlock with a request. `add_check_constraint` adds a check without scanning the
table under that lock (`NOT VALID`, then `VALIDATE`, which lets reads and writes through).
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


def alter_table_alone(table: str, *actions: str) -> None:
    """`ALTER TABLE table action, ...` committed on its own: the revision holds no other table's lock
    while it waits for this one. Each action must be safe to repeat (`ADD COLUMN IF NOT EXISTS`), since
    a revision stopped after it leaves it applied."""
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE {table} {', '.join(actions)}")


def add_check_constraint(name: str, table: str, condition: str) -> None:
    """A check on a table with rows: added `NOT VALID` (a brief lock, no scan), then validated under
    SHARE UPDATE EXCLUSIVE, which blocks no request while it reads every row."""
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID")
        op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")
