"""The schema comes from migrations alone: upgrade from empty, and downgrade back to empty."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic import command
from alembic.config import Config

from conftest import ROOT, create_database, drop_database
from mediagen.core.db import libpq_url


@pytest.fixture
def empty_database(postgres_admin_url: str) -> Iterator[str]:
    name = f"mediagen_migrations_{uuid.uuid4().hex[:8]}"
    url = create_database(postgres_admin_url, name)
    yield url
    drop_database(postgres_admin_url, name)


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def tables(url: str) -> set[str]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {row[0] for row in rows}


def test_migrations_upgrade_from_empty_and_downgrade_back(empty_database: str) -> None:
    config = alembic_config(empty_database)

    command.upgrade(config, "head")
    assert {"jobs", "attempts", "outputs", "alembic_version"} <= tables(empty_database)

    command.downgrade(config, "base")
    assert tables(empty_database) <= {"alembic_version"}

    command.upgrade(config, "head")
    assert {"jobs", "attempts", "outputs"} <= tables(empty_database)


def test_the_models_match_the_migrations(empty_database: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from mediagen.core.db import sync_url
    from mediagen.core.models import Base

    command.upgrade(alembic_config(empty_database), "head")
    engine = create_engine(sync_url(empty_database))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []
