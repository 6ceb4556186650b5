"""Why a queued task waits, read from the worker registry inside the caller's transaction: every live worker is
paused (e.g. for disk space), or no worker can serve at all because every one that registered failed to load its
model (e.g. too big for its device) and none is alive. The note its debugoutput shows, and the reason Run refuses
new tasks with in the second case."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.errors import redact_paths
from server.store.models import Worker

WAITING_NOTE = "Waiting in the queue:"
"""How a queued task's debugoutput starts while no worker takes tasks (see TaskLifecycle.note_waiting)."""


def _alive(workers: list[Worker], now: float, lease_seconds: float) -> list[Worker]:
    """Workers whose process is there (loading, ready, busy, paused, stopping: a heartbeat within one lease)."""
    return [w for w in workers if w.state not in ("stopped", "failed") and now - w.heartbeat_at <= lease_seconds]


def no_worker_reason(workers: list[Worker], now: float, lease_seconds: float) -> str:
    """Why no worker can serve a task: a worker failed to load its model after every other worker was last seen,
    and none is alive; "" otherwise (a worker is alive, none has registered yet: workers may be on other hosts, still
    starting, or the failures are older than a worker that ran or stopped since: they are history, not the state)."""
    others_seen = max((w.heartbeat_at for w in workers if w.state != "failed"), default=float("-inf"))
    failed = [w for w in workers if w.state == "failed" and w.heartbeat_at >= others_seen]
    if not failed or _alive(workers, now, lease_seconds):
        return ""
    first = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return ("No worker can run tasks: no worker is running, and the last to start failed to load its model. "
            f"{first.id}{more}: {redact_paths(first.detail or 'failed')}")


def waiting_note(s: Session, now: float, lease_seconds: float) -> str:
    """The note when every live worker (its heartbeat within one lease) is paused, or when no worker can serve
    (no_worker_reason); "" otherwise (some worker will take the task, or none is alive to say)."""
    workers = list(s.scalars(select(Worker).order_by(Worker.id)))
    reason = no_worker_reason(workers, now, lease_seconds)
    if reason:
        return f"{WAITING_NOTE} {reason} The task starts when a worker comes back."
    alive = _alive(workers, now, lease_seconds)
    if not alive or any(w.state != "paused" for w in alive):
        return ""
    first = alive[0]
    more = f" (and {len(alive) - 1} more)" if len(alive) > 1 else ""
    return (f"{WAITING_NOTE} every worker is paused, so no task starts until one can go on. "
            f"{first.id}{more}: {first.detail or 'paused'}")
