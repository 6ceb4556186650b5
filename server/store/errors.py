"""What a store call answers when the task is not (or no longer) the caller's to change."""

from __future__ import annotations


class TaskLost(Exception):
    """The worker no longer owns the task (it was requeued, failed or cancelled behind its back)."""


class TaskKilled(TaskLost):
    """A kill was asked while the worker was finishing: the task ends in task_cancel, not with outputs."""


class QueueFull(Exception):
    pass
