"""Upgrades while the service runs: no request waits on a migration longer than its lock timeout.

The traffic is what the API and the worker do to the tables (submits, status reads, attempts written
and finished), in connections of their own with no timeout: a request queued behind a migration waits
as long as the migration makes it. The database starts at 0910_model_input with rows, so the upgrade
runs 0920_spend (ALTER TABLE attempts: ACCESS EXCLUSIVE) and 0930_finished_at_index (an index on
attempts, built while they are written).
"""

from __future__ import annotations

import io
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from conftest import ROOT
from mediagen.core.db import libpq_url
from test_migrations import alembic_config, empty_database  # noqa: F401 (a fixture)

LOCK_TIMEOUT = 1.0
SLACK = 1.0  # a loaded two-core machine; a request held behind a blocked migration would wait ~8 s
BLOCKER_HOLDS = 8.0


class Traffic:
    """Submits, status reads and attempt writes in a loop, each timed; run in a thread per kind."""

    def __init__(self, url: str) -> None:
        self.url = libpq_url(url)
        self.stop = threading.Event()
        self.durations: list[float] = []
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._loop, args=(step,)) for step in (self._submit, self._read)]
        self.job_ids: list[uuid.UUID] = []

    def _submit(self, conn: psycopg.Connection) -> None:
        job_id = uuid.uuid4()
        with conn.transaction():
            conn.execute(
                "INSERT INTO jobs (id, status, prompt, parameters, model, max_attempts, deadline_at) "
                "VALUES (%s, 'running', 'a cat', '{}', 'm/m', 5, now() + interval '1 hour')",
                (job_id,),
            )
            conn.execute("INSERT INTO attempts (job_id, number) VALUES (%s, 1)", (job_id,))
        with conn.transaction():
            conn.execute("UPDATE attempts SET finished_at = now(), outcome = 'succeeded' WHERE job_id = %s", (job_id,))
            conn.execute("UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = %s", (job_id,))
        self.job_ids.append(job_id)

    def _read(self, conn: psycopg.Connection) -> None:
        job_id = self.job_ids[-1] if self.job_ids else uuid.uuid4()
        with conn.transaction():
            conn.execute("SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchall()
            conn.execute("SELECT number, outcome FROM attempts WHERE job_id = %s", (job_id,)).fetchall()
            conn.execute("SELECT id FROM jobs ORDER BY created_at DESC, id DESC LIMIT 20").fetchall()

    def _loop(self, step: object) -> None:
        assert callable(step)
        try:
            with psycopg.connect(self.url) as conn:
                while not self.stop.is_set():
                    started = time.monotonic()
                    step(conn)
                    self.durations.append(time.monotonic() - started)
                    time.sleep(0.005)
        except BaseException as error:  # reported by the test, not lost in a thread
            self.errors.append(error)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        time.sleep(0.3)  # requests are flowing before the migration starts
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    @property
    def longest(self) -> float:
        return max(self.durations)


@contextmanager
def open_transaction(url: str, statement: str, holds: float = BLOCKER_HOLDS) -> Iterator[int]:
    """A long transaction (a slow report, a stuck client) holding what `statement` locks for `holds`
    seconds, or until the block ends; yields its pid."""
    done = threading.Event()
    ready = threading.Event()
    pid: list[int] = []

    def hold() -> None:
        with psycopg.connect(libpq_url(url)) as conn:
            conn.execute(statement).fetchall()
            pid.append(conn.info.backend_pid)
            ready.set()
            done.wait(holds)
            conn.rollback()

    thread = threading.Thread(target=hold)
    thread.start()
    assert ready.wait(10)
    try:
        yield pid[0]
    finally:
        done.set()
        thread.join()


def revision(url: str) -> str:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert row is not None
    return str(row[0])


def head() -> str:
    head = ScriptDirectory.from_config(alembic_config("postgresql://unused/x")).get_current_head()
    assert head is not None
    return head


def index_is_valid(url: str, name: str) -> bool:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)).fetchone()
    return bool(row and row[0])


@pytest.fixture
def database_with_rows(empty_database: str) -> str:  # noqa: F811 (the fixture imported above)
    """At 0910_model_input, the revision before the ones that lock `attempts`, with 100,000 attempts."""
    command.upgrade(alembic_config(empty_database), "0910_model_input")
    with psycopg.connect(libpq_url(empty_database)) as conn:
        conn.execute(
            "INSERT INTO jobs (id, status, prompt, parameters, model, max_attempts, deadline_at, created_at) "
            "SELECT gen_random_uuid(), 'succeeded', 'old', '{}', 'm/m', 5, now(), now() - n * interval '1 s' "
            "FROM generate_series(1, 20000) AS n"
        )
        conn.execute(
            "INSERT INTO attempts (job_id, number, finished_at, outcome) "
            "SELECT id, n, created_at, 'succeeded' FROM jobs, generate_series(1, 5) AS n"
        )
    return empty_database


def upgrade(url: str, target: str = "head") -> None:
    config = alembic_config(url)
    config.attributes["lock_timeout_seconds"] = LOCK_TIMEOUT
    command.upgrade(config, target)


def test_a_migration_blocked_by_a_long_transaction_fails_fast_and_holds_no_request_up(
    database_with_rows: str,
) -> None:
    url = database_with_rows
    with Traffic(url) as traffic:
        with open_transaction(url, "SELECT count(*) FROM attempts") as blocker:
            started = time.monotonic()
            with pytest.raises(CommandError) as failure:
                upgrade(url)
            failed_after = time.monotonic() - started
            time.sleep(0.5)  # requests go on while the long transaction is still open
        upgrade(url)  # once it has ended, the same upgrade goes through, requests still flowing

    assert not traffic.errors
    message = str(failure.value)
    assert f"no lock within {LOCK_TIMEOUT:g} s" in message
    assert "MEDIAGEN_MIGRATION_LOCK_TIMEOUT_SECONDS" in message
    assert f"pid {blocker} " in message and "ALTER TABLE attempts" in message
    assert "stays at revision 0910_model_input" in message
    assert failed_after < LOCK_TIMEOUT + SLACK + 1.0  # the migration itself loads in well under a second
    assert traffic.longest < LOCK_TIMEOUT + SLACK, f"a request waited {traffic.longest:.2f} s"
    assert revision(url) == head()
    assert index_is_valid(url, "ix_attempts_finished_at")


def test_an_index_is_built_while_attempts_are_written(database_with_rows: str) -> None:
    url = database_with_rows
    upgrade(url, "0920_spend")
    with Traffic(url) as traffic:
        # A worker's transaction that wrote an attempt and has not committed yet: a plain CREATE INDEX
        # would queue behind it (and every write behind that) until the lock timeout failed it.
        writer = "UPDATE attempts SET outcome = 'succeeded' WHERE id = 1 RETURNING id"
        with open_transaction(url, writer, holds=3.0):
            started = time.monotonic()
            upgrade(url)
            took = time.monotonic() - started

    assert not traffic.errors
    assert revision(url) == head()
    assert index_is_valid(url, "ix_attempts_finished_at")
    assert took > 2 * LOCK_TIMEOUT, "the build waited for the open transaction, past the lock timeout, unfailed"
    assert traffic.longest < LOCK_TIMEOUT, f"a request waited {traffic.longest:.2f} s"


def test_every_index_on_a_table_of_an_earlier_revision_is_built_concurrently() -> None:
    """For the revisions to come: a table that has rows gets its indexes from `online_ddl`."""
    buffer = io.StringIO()
    config = Config(str(ROOT / "alembic.ini"), output_buffer=buffer)
    config.set_main_option("sqlalchemy.url", "postgresql://offline/render-only")
    config.attributes["configure_logger"] = False
    command.upgrade(config, "base:head", sql=True)

    earlier: set[str] = set()
    blocking = []
    for chunk in re.split(r"^-- Running upgrade ", buffer.getvalue(), flags=re.MULTILINE)[1:]:
        name = chunk.split("\n", 1)[0]
        for index, table in re.findall(r"^CREATE (?:UNIQUE )?INDEX (\w+) ON (\w+)", chunk, flags=re.MULTILINE):
            if table in earlier:
                blocking.append(f"{name}: {index} on {table}")
        earlier |= set(re.findall(r"^CREATE TABLE (\w+)", chunk, flags=re.MULTILINE))
    assert earlier >= {"jobs", "attempts"}  # the rendering was read
    assert blocking == []
