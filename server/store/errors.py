"""What a store call answers when the task is not (or no longer) the caller's to change."""

from __future__ import annotations


class TaskLost(Exception):
    """The worker no longer owns the task (it was requeued, failed or cancelled behind its back)."""


class TaskKilled(TaskLost):
    """A kill was asked while the worker was finishing: the task ends in task_cancel, not with outputs."""


class QueueFull(Exception):
    pass


class NoWorker(Exception):
    """No worker can serve a new task (every registered worker failed to load its model, none is alive): the
    message says why (server/store/waiting.py)."""


class TooManyActive(Exception):
    """The API key already has its most tasks between task_queue and a terminal status."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(
            f"Too many active tasks for this API key: {active} are queued or running and the limit is {limit} per "
            "key on this server. Wait for one to finish (or cancel or kill one), then try again."
        )
        self.active, self.limit = active, limit
