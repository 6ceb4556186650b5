"""The callback outbox: a finished task with a callbackUrl is `pending` (server.store.transitions marks it); any
API process claims due ones, holds them while it sends, and records each attempt with exponential back-off."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import select

from server.store.db import Database
from server.store.models import Task


class CallbackOutbox:
    def __init__(self, db: Database, *, attempts: int = 5, backoff_seconds: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.clock = clock

    def claim_due(self, limit: int = 16, hold_seconds: float = 60.0) -> list[int]:
        """Tasks whose callback is due now; held for `hold_seconds` so no other process sends it too."""
        now = self.clock()
        with self.db.session(write=True) as s:
            stmt = (
                select(Task)
                .where(Task.callback_state == "pending", Task.callback_next_at <= now)
                .order_by(Task.callback_next_at)
                .limit(limit)
            )
            if self.db.is_postgres:
                stmt = stmt.with_for_update(skip_locked=True)
            tasks = list(s.scalars(stmt))
            for task in tasks:
                task.callback_next_at = now + hold_seconds
            return [t.id for t in tasks]

    def record(self, task_id: int, delivered: bool) -> tuple[str, int, float | None]:
        """Count one attempt; answers (state, attempts, next attempt time or None)."""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = s.get(Task, task_id, with_for_update=True)
            if task is None:
                return "failed", 0, None
            task.callback_attempts += 1
            if delivered:
                task.callback_state, task.callback_next_at = "delivered", None
            elif task.callback_attempts >= self.attempts:
                task.callback_state, task.callback_next_at = "failed", None
            else:
                wait = self.backoff_seconds * 2 ** (task.callback_attempts - 1)
                task.callback_next_at = now + wait
            return task.callback_state, task.callback_attempts, task.callback_next_at
