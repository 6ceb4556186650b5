"""What the routes share: settings, the task store, output storage, the authenticator, task rendering."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.params import limits_from_settings
from server.auth import Authenticator
from server.storage import Storage
from server.store import Database, DbNonceStore, Store, StoreOptions, upgrade
from server.task_view import OutputLike, TaskLike, task_dict
from server.validation import RunOptions


@dataclass
class Services:
    settings: Any
    store: Store
    storage: Storage
    auth: Authenticator
    run: RunOptions

    @classmethod
    def open(cls, settings: Any) -> Services:
        """Connect to the database and bring its schema up to date (Alembic)."""
        db = Database(settings.sqlalchemy_url)
        upgrade(db)
        auth = Authenticator.from_settings(settings, DbNonceStore(db))
        store = Store(db, StoreOptions(
            url=settings.sqlalchemy_url, lease_seconds=settings.lease_seconds, requeue_limit=settings.requeue_limit,
            max_queue_length=settings.max_queue_length, max_active_per_key=settings.max_active_tasks_per_key,
            callback_attempts=settings.callback_attempts,
            callback_backoff_seconds=settings.callback_backoff_seconds))
        run = RunOptions(limits_from_settings(settings), settings.max_image_bytes, settings.allow_private_urls)
        return cls(settings, store, Storage.from_settings(settings), auth, run)

    def close(self) -> None:
        self.store.db.dispose()

    def views(self, tasks: list[TaskLike], outputs: dict[int, list[OutputLike]] | None = None) -> list[dict[str, Any]]:
        outputs = outputs if outputs is not None else self.store.reads.outputs(t.id for t in tasks)
        return [task_dict(t, outputs[t.id], self.storage, self.settings.cost_per_second) for t in tasks]

    def detail_body(self, task: TaskLike, outputs: list[OutputLike] | None = None) -> dict[str, Any]:
        """Task/Detail's answer for one task (also what callbackUrl receives)."""
        known = None if outputs is None else {task.id: outputs}
        return {"total": "1", "errors": [], "tasklist": self.views([task], known), "result": True}
