"""What the routes share: the server's options, the task store, output storage, the authenticator, task rendering.

The entry point opens them (particalize.compose_server.open_services) and hands them to the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.auth import Authenticator
from server.options import ServerOptions
from server.storage import Storage
from server.store import Store
from server.task_view import OutputLike, TaskLike, task_dict


@dataclass
class Services:
    options: ServerOptions
    store: Store
    storage: Storage
    auth: Authenticator

    def close(self) -> None:
        self.store.db.dispose()

    def views(self, tasks: list[TaskLike], outputs: dict[int, list[OutputLike]] | None = None) -> list[dict[str, Any]]:
        outputs = outputs if outputs is not None else self.store.reads.outputs(t.id for t in tasks)
        cost_per_second = self.options.tool.cost_per_second
        catalogue = self.options.tool.catalogue
        return [task_dict(t, outputs[t.id], self.storage, cost_per_second, catalogue) for t in tasks]

    def detail_body(self, task: TaskLike, outputs: list[OutputLike] | None = None) -> dict[str, Any]:
        """Task/Detail's answer for one task (also what callbackUrl receives)."""
        known = None if outputs is None else {task.id: outputs}
        return {"total": "1", "errors": [], "tasklist": self.views([task], known), "result": True}
