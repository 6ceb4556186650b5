"""The worker registry: one row per worker (one per GPU), its state, what it loaded, and its heartbeat, which also
renews the lease of the task it holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update

from server.store.db import Database
from server.store.models import RUNNING, Task, Worker


class WorkerRegistry:
    def __init__(self, db: Database, lease_seconds: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self.clock = clock

    def register(
        self, worker_id: str, *, pid: int, model: str, device: str, state: str, detail: str = "", version: str = "",
        random_weights: bool = False,
    ) -> None:
        now = self.clock()
        with self.db.session(write=True) as s:
            row = s.get(Worker, worker_id) or Worker(id=worker_id, started_at=now)
            row.state, row.pid, row.model, row.device, row.detail = state, pid, model, device, detail
            row.version, row.random_weights = version, random_weights
            row.started_at, row.heartbeat_at, row.task_id = now, now, None
            s.add(row)

    def set_state(self, worker_id: str, state: str, detail: str | None = None, task_id: int | None = None) -> None:
        """Record the worker's state and the task it holds now (None: none)."""
        with self.db.session(write=True) as s:
            values: dict[str, Any] = {"state": state, "heartbeat_at": self.clock(), "task_id": task_id}
            if detail is not None:
                values["detail"] = detail
            s.execute(update(Worker).where(Worker.id == worker_id).values(**values))

    def heartbeat(self, worker_id: str, task_id: int | None) -> None:
        """The worker is alive; its task's lease is renewed."""
        now = self.clock()
        with self.db.session(write=True) as s:
            s.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=now))
            if task_id is not None:
                s.execute(
                    update(Task)
                    .where(Task.id == task_id, Task.worker_id == worker_id, Task.status.in_(RUNNING))
                    .values(lease_expires_at=now + self.lease_seconds)
                    .execution_options(synchronize_session=False)
                )

    def all(self) -> list[Worker]:
        with self.db.session() as s:
            return list(s.scalars(select(Worker).order_by(Worker.id)))

    def heartbeat_fresh(self, worker: Worker, now: float) -> bool:
        """The worker beat within one lease (it beats 4 times a lease): its process is alive."""
        return now - worker.heartbeat_at <= self.lease_seconds
