"""Schema migrations (Alembic), applied programmatically at start by `serve` and `worker`."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from server.store.db import Database

logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per plugin and step at INFO: noise

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_PG_LOCK_KEY = 7_301_244_190  # any constant: serializes concurrent upgrades of one PostgreSQL database


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the schema to `revision`. Safe when several processes start at once: on SQLite the write
    transaction holds the database lock, on PostgreSQL an advisory lock."""
    config = alembic_config()
    with db.connect(write=True) as conn:
        if db.is_postgres:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def current_revision(db: Database) -> str | None:
    with db.connect() as conn:
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(conn).get_current_revision()
