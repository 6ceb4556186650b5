"""What the routes share: settings, the task store, output storage, the authenticator, task rendering."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.auth import Authenticator
from server.storage import Storage
from server.store import Database, DbNonceStore, TaskStore, upgrade
from server.task_view import OutputLike, TaskLike, task_dict


@dataclass
class Services:
    settings: Any
    store: TaskStore
    storage: Storage
    auth: Authenticator

    @classmethod
    def open(cls, settings: Any) -> Services:
        """Connect to the database and bring its schema up to date (Alembic)."""
        db = Database(settings.sqlalchemy_url)
        upgrade(db)
        auth = Authenticator.from_settings(settings, DbNonceStore(db))
        return cls(settings, TaskStore.from_settings(db, settings), Storage.from_settings(settings), auth)

    def close(self) -> None:
        self.store.db.dispose()

    def views(self, tasks: list[TaskLike], outputs: dict[int, list[OutputLike]] | None = None) -> list[dict[str, Any]]:
        outputs = outputs if outputs is not None else self.store.outputs(t.id for t in tasks)
        return [task_dict(t, outputs[t.id], self.storage, self.settings.cost_per_second) for t in tasks]

    def detail_body(self, task: TaskLike, outputs: list[OutputLike] | None = None) -> dict[str, Any]:
        """Task/Detail's answer for one task (also what callbackUrl receives)."""
        known = None if outputs is None else {task.id: outputs}
        return {"total": "1", "errors": [], "tasklist": self.views([task], known), "result": True}
