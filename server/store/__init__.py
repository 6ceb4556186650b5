"""Durable state: tasks, outputs, uploads, nonces and workers in SQLite (default) or PostgreSQL."""

from server.store.db import Database
from server.store.migrate import upgrade
from server.store.nonces import DbNonceStore
from server.store.tasks import (
    NewOutput,
    NewUpload,
    QueueFull,
    TaskKilled,
    TaskLost,
    TaskStore,
    TooManyActive,
    new_id,
    new_token,
)

__all__ = [
    "Database",
    "DbNonceStore",
    "NewOutput",
    "NewUpload",
    "QueueFull",
    "TaskKilled",
    "TaskLost",
    "TaskStore",
    "TooManyActive",
    "new_id",
    "new_token",
    "upgrade",
]


def open_store(settings) -> TaskStore:  # type: ignore[no-untyped-def]
    """The settings' database, migrated to the newest schema."""
    db = Database(settings.sqlalchemy_url)
    upgrade(db)
    return TaskStore.from_settings(db, settings)
