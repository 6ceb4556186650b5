"""The task store: one database and its parts, one per job. The API uses them all; a worker the lifecycle, the
uploads it reads its image from and the worker registry."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from server.store.db import Database
from server.store.lifecycle import TaskLifecycle
from server.store.migrate import upgrade
from server.store.outbox import CallbackOutbox
from server.store.reads import TaskReads
from server.store.uploads import Uploads
from server.store.workers import WorkerRegistry


@dataclass(frozen=True)
class StoreOptions:
    url: str = ""
    """SQLAlchemy URL of the database (`open_store`); unused when a `Database` is handed to `Store`."""
    listen_url: str | None = None
    """Where the listening connections go, if not `url` (PostgreSQL; server/store/db.py)."""
    lease_seconds: float = 60.0
    requeue_limit: int = 1
    max_queue_length: int = 1000
    max_active_per_key: int = 0
    """Most tasks one API key may have between task_queue and a terminal status (0: no limit)."""
    callback_attempts: int = 5
    callback_backoff_seconds: float = 1.0


class Store:
    def __init__(self, db: Database, options: StoreOptions | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.options = options = options or StoreOptions(url=db.url)
        self.tasks = TaskLifecycle(db, lease_seconds=options.lease_seconds, requeue_limit=options.requeue_limit,
                                   max_queue_length=options.max_queue_length,
                                   max_active_per_key=options.max_active_per_key)
        self.reads = TaskReads(db)
        self.uploads = Uploads(db)
        self.workers = WorkerRegistry(db, options.lease_seconds)
        self.callbacks = CallbackOutbox(db, attempts=options.callback_attempts,
                                        backoff_seconds=options.callback_backoff_seconds)
        self.clock = clock

    @property
    def clock(self) -> Callable[[], float]:
        """The time every part stamps (tests set a fixed one)."""
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        for part in (self.tasks, self.uploads, self.workers, self.callbacks):
            part.clock = clock


def open_store(options: StoreOptions) -> Store:
    """The database at `options.url`, migrated to the newest schema."""
    db = Database(options.url, options.listen_url)
    upgrade(db)
    return Store(db, options)
