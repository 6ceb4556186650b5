"""How one task's run can end, in one table: for each outcome, how its end is recorded in the store, whether its
output is thrown away, and what the log says.

A run either returns (done) or raises; `ending_of` names the outcome of what it raised. `TaskEnd` is raised by the
run itself for the outcomes it decides (a kill, a stop, bad input, no room to write, storage refusing the output);
the store's own answers (the task killed or lost meanwhile, an outage) and any other exception map to theirs here.
A store error that is not an outage is a bug: it is raised again, not turned into an outcome.

A worker deletes only outputs it still owns: a task's output folder is removed only after the store has taken
this run's end of it as the end of a task still this worker's (a kill, a failure), which then has no recorded
output, so nothing there is anyone's result. A run that is sent back to the queue has stored nothing; one whose
task was lost, or whose video may already be recorded (an outage while finishing), touches nothing.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from pipeline.errors import OutOfMemory
from pipeline.out_of_memory import is_out_of_memory
from server.errors import public_text
from server.store import TaskKilled, TaskLifecycle, TaskLost
from server.store.outage import is_outage


class Outcome(enum.Enum):
    DONE = "done"
    KILLED = "killed"
    """Stopped for a kill; the note says where, recorded with the task_cancel."""
    KILL_RECORDED = "killed, as recorded by the kill"
    """A store write found the task already killed: Task/Kill recorded where (at which status)."""
    STOPPED = "stopped by the worker's shutdown"
    STORE_OUTAGE = "store outage"
    """Before the video is made: the task goes back to the queue once the store answers."""
    UNRECORDED = "video made, store unavailable until the worker had to stop"
    """The store did not answer before a stopping worker's finishing time was over: nothing is recorded or
    deleted (the video may be stored, even recorded with a lost answer); if the task was not recorded, its lease
    requeues it."""
    LOST = "lost"
    """The task is no longer this worker's (requeued or ended behind its back): nothing to record or discard."""
    DISK_FULL = "disk full"
    BAD_INPUT = "bad input"
    STORAGE_FAILED = "output not stored"
    OUT_OF_MEMORY = "out of memory"
    """The run ran out of memory; the generator released it and serves the next task."""
    INTERNAL_ERROR = "internal error"


Record = Callable[[TaskLifecycle, int, str, str], object]
"""(lifecycle, task id, worker id, note) -> records how the task ended."""


def _finish_killed(tasks: TaskLifecycle, task_id: int, worker_id: str, note: str) -> object:
    return tasks.finish_killed(task_id, worker_id, note)


def _requeue(note: str) -> Record:
    return lambda tasks, task_id, worker_id, _note: tasks.release(task_id, worker_id, note)


def _fail(tasks: TaskLifecycle, task_id: int, worker_id: str, note: str) -> object:
    return tasks.fail(task_id, note, worker_id)


@dataclass(frozen=True)
class Handling:
    record: Record | None
    discard: bool
    """Throw the task's output folder away (no partial output is left behind), once `record` has been taken
    by the store: the task was still this worker's and ends without an output, so none of it is anyone's
    result. Without a record, the outcome itself is the store's answer that the task was this worker's."""
    level: int
    log: str
    """The log line: {task} and {note} (and {seconds} for a finished task) are filled in."""


HANDLING: dict[Outcome, Handling] = {
    Outcome.DONE: Handling(None, False, logging.INFO, "task {task} done in {seconds:.2f}s"),
    Outcome.KILLED: Handling(_finish_killed, True, logging.INFO, "task {task} killed: {note}"),
    Outcome.KILL_RECORDED: Handling(None, True, logging.INFO, "task {task} killed"),
    # Sent back before the video is made, so the run stored nothing; the next run writes the output afresh.
    Outcome.STOPPED: Handling(_requeue("requeued: the worker stopped"), False, logging.INFO,
                              "task {task} put back in the queue: the worker is stopping"),
    # The store went away where the task cannot wait for it: back to the queue once the store answers, without
    # counting the attempt (no worker died); if the worker must stop first, its lease requeues it.
    Outcome.STORE_OUTAGE: Handling(_requeue("requeued: the task store was unavailable"), False, logging.INFO,
                                   "task {task} put back in the queue: the task store was unavailable"),
    Outcome.UNRECORDED: Handling(None, False, logging.WARNING,
                                 "task {task}: its video is made but the task store did not answer before the "
                                 "worker had to stop; if it was not recorded, its lease requeues the task"),
    Outcome.LOST: Handling(None, False, logging.WARNING, "task {task}: {note}"),
    Outcome.DISK_FULL: Handling(_fail, True, logging.INFO, "task {task} failed: {note}"),
    Outcome.BAD_INPUT: Handling(_fail, True, logging.INFO, "task {task} failed: {note}"),
    Outcome.STORAGE_FAILED: Handling(_fail, True, logging.INFO, "task {task} failed: {note}"),
    Outcome.OUT_OF_MEMORY: Handling(_fail, True, logging.WARNING, "task {task} failed: {note}"),
    Outcome.INTERNAL_ERROR: Handling(_fail, True, logging.ERROR, "task {task} failed"),
}


class TaskEnd(Exception):
    """The run ends here with `outcome`; `note` is what is recorded (for a failure: what the client reads in
    debugerror)."""

    def __init__(self, outcome: Outcome, note: str = "") -> None:
        super().__init__(note or outcome.value)
        self.outcome = outcome
        self.note = note


@dataclass(frozen=True)
class Ending:
    outcome: Outcome
    note: str = ""
    error: BaseException | None = None
    """The unexpected exception of an internal error (its traceback goes to the log)."""


def ending_of(exc: Exception) -> Ending:
    """The outcome of what a run raised. A store error that is not an outage is raised again."""
    if isinstance(exc, TaskEnd):
        return Ending(exc.outcome, exc.note)
    if isinstance(exc, OutOfMemory):
        return Ending(Outcome.OUT_OF_MEMORY, public_text(exc))
    if isinstance(exc, TaskKilled):
        return Ending(Outcome.KILL_RECORDED)
    if isinstance(exc, TaskLost):
        return Ending(Outcome.LOST, str(exc))
    if isinstance(exc, SQLAlchemyError):
        if not is_outage(exc):
            raise exc
        return Ending(Outcome.STORE_OUTAGE)
    return Ending(Outcome.INTERNAL_ERROR, failure_reason(exc), exc)


def failure_reason(exc: BaseException) -> str:
    """What a client reads in debugerror for an exception the worker did not expect (no server paths in it)."""
    text = public_text(exc) or type(exc).__name__
    if is_out_of_memory(exc):  # raised outside the generator's run (it raises OutOfMemory, with the size)
        return (
            f"Out of memory while generating ({text}); ask for fewer frames (numFrames), a smaller "
            "width/height or fewer steps, or try again when the GPU is less busy."
        )
    return f"Internal error: {type(exc).__name__}: {text}"
