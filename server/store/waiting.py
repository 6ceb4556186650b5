"""Why a queued task waits when every live worker is paused (e.g. for disk space): the note its debugoutput shows,
read from the worker registry inside the caller's transaction."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.store.models import Worker

WAITING_NOTE = "Waiting in the queue:"
"""How a queued task's debugoutput starts while every worker is paused (see TaskLifecycle.note_waiting)."""


def waiting_note(s: Session, now: float, lease_seconds: float) -> str:
    """The note when every live worker (its heartbeat within one lease) is paused; "" otherwise (some worker will
    take the task, or none is alive to say)."""
    alive = [w for w in s.scalars(select(Worker).order_by(Worker.id))
             if w.state not in ("stopped", "failed") and now - w.heartbeat_at <= lease_seconds]
    if not alive or any(w.state != "paused" for w in alive):
        return ""
    first = alive[0]
    more = f" (and {len(alive) - 1} more)" if len(alive) > 1 else ""
    return (f"{WAITING_NOTE} every worker is paused, so no task starts until one can go on. "
            f"{first.id}{more}: {first.detail or 'paused'}")
