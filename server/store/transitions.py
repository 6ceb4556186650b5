"""How a task row changes state, inside a caller's transaction: the status with its time stamp and event, the
text debugoutput shows, and a requeue. Every writer of a task's status goes through these.

A running task's status only moves forward along Wiro's lifecycle (`is_before`): a worker repeating a step (a
retry after an outage whose answer was lost) or one behind another worker's run never moves it back. Only a
requeue (a graceful stop before the video is made, or a dead worker's lease) starts it over at task_queue."""

from __future__ import annotations

from sqlalchemy.orm import Session

from server.store.models import CANCEL, LIFECYCLE, QUEUED, STAMPS, TERMINAL, Task, TaskEvent
from server.task_record import record_of


def is_before(status: str, other: str) -> bool:
    """`status` comes strictly before `other` in Wiro's lifecycle (task_cancel comes after everything)."""
    def rank(s: str) -> int:
        return LIFECYCLE.index(s) if s in LIFECYCLE else len(LIFECYCLE)
    return rank(status) < rank(other)


def add_event(s: Session, task_id: int, status: str, at: float, message: str = "", *, step: int | None = None,
              total: int | None = None) -> None:
    s.add(TaskEvent(task_id=task_id, status=status, at=at, message=message, step=step, total=total))


def set_status(s: Session, task: Task, status: str, now: float, message: str = "", *, step: int | None = None,
               total: int | None = None) -> None:
    task.status = status
    stamp = STAMPS.get(status)
    if stamp is not None:
        setattr(task, stamp, now)
    if status == CANCEL:
        task.endtime = now  # a cancelled or killed task has ended too (canceltime says how)
    if status in TERMINAL:
        task.lease_expires_at = None
        if record_of(task).callback_url:
            task.callback_state, task.callback_next_at = "pending", now
    add_event(s, task.id, status, now, message, step=step, total=total)


def say(task: Task, text: str) -> None:
    """What debugoutput shows now: `text`, in place of the progress numbers (which it shows while they are the
    latest news; see server.task_view)."""
    task.debugoutput = text
    task.progress_step = task.progress_total = None
    task.progress_elapsed = None


def show_progress(task: Task, step: int, total: int, elapsed: float) -> None:
    """The running task's latest denoising step, as numbers; debugoutput is rendered from them."""
    task.debugoutput = ""
    task.progress_step, task.progress_total, task.progress_elapsed = step, total, elapsed


def requeue(s: Session, task: Task, now: float, note: str) -> None:
    for stamp in STAMPS.values():
        setattr(task, stamp, 0.0)
    task.worker_id = None
    task.lease_expires_at = None
    say(task, note)
    set_status(s, task, QUEUED, now, message=note)
