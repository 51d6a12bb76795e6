"""Alembic runs migrations with psycopg 3 against DATABASE_URL (or the URL passed in config), while the
service keeps running.

- Each revision is a transaction of its own (`transaction_per_migration`), so a revision can build an
  index `CONCURRENTLY` outside any transaction (`online_ddl.create_index_concurrently`), and a
  failure leaves the database at the last revision that finished.
- Every lock is waited for at most MEDIAGEN_MIGRATION_LOCK_TIMEOUT_SECONDS (`lock_timeout`): a statement
  that needs `ACCESS EXCLUSIVE` on a table a long transaction uses fails after that long, instead of
  queueing every request on that table behind it until the long transaction ends. The failure is an
  alembic `CommandError` that says which sessions were in the way; nothing of the revision is kept.
"""

from __future__ import annotations

import sys
from logging.config import fileConfig
from pathlib import Path

from alembic import context
from alembic.util import CommandError
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.exc import OperationalError

from mediagen.core.db import sync_url
from mediagen.core.models import Base
from mediagen.settings import get_settings

LOCK_NOT_AVAILABLE = "55P03"
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the revisions import `online_ddl` from here

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
    if not url:
        raise SystemExit("DATABASE_URL is not set: nothing to migrate")
    return sync_url(url)


def _lock_timeout_seconds() -> float:
    """`config.attributes["lock_timeout_seconds"]` (tests, callers), else the setting."""
    value = config.attributes.get("lock_timeout_seconds")
    return float(value) if value is not None else get_settings().migration_lock_timeout_seconds


def _lock_timeout_ms() -> int:
    return max(1, round(_lock_timeout_seconds() * 1000))


def _sessions_in_the_way(connection: Connection, older_than: float) -> list[str]:
    """The other sessions whose transaction has been open longer than the lock wait: the likely holders."""
    rows = connection.execute(
        text(
            "SELECT pid, state, application_name, extract(epoch FROM now() - xact_start) AS open_for, query "
            "FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname = current_database() "
            "AND xact_start < now() - make_interval(secs => :older_than) ORDER BY xact_start LIMIT 5"
        ),
        {"older_than": older_than},
    ).all()
    return [
        f"pid {row.pid} ({row.state}, transaction open {row.open_for:.0f} s, "
        f"application {row.application_name or '?'!r}, last query {row.query[:120]!r})"
        for row in rows
    ]


def _lock_timeout_error(connection: Connection, error: OperationalError, timeout: float) -> CommandError:
    connection.rollback()
    current = context.get_context().get_current_revision()
    holders = _sessions_in_the_way(connection, timeout) or ["none is left: retry now"]
    statement = " ".join(str(error.statement or "").split())[:200]
    return CommandError(
        f"migration stopped: no lock within {timeout:g} s (MEDIAGEN_MIGRATION_LOCK_TIMEOUT_SECONDS) for "
        f"{statement!r}; the database stays at revision {current}, nothing of the next one was applied. "
        f"Long transactions in the way: {'; '.join(holders)}. Run the upgrade again once they end."
    )


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, transaction_per_migration=True)
    context.execute(f"SET lock_timeout = '{_lock_timeout_ms()}ms'")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    timeout = _lock_timeout_seconds()
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # For the session, not a transaction: it holds across the revisions' own transactions and
        # autocommit blocks. A concurrent index build turns it off for its own wait (it blocks no request).
        connection.exec_driver_sql(f"SET lock_timeout = '{_lock_timeout_ms()}ms'")
        connection.commit()
        context.configure(connection=connection, target_metadata=target_metadata, transaction_per_migration=True)
        try:
            with context.begin_transaction():
                context.run_migrations()
        except OperationalError as error:
            if getattr(error.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            raise _lock_timeout_error(connection, error, timeout) from error
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
