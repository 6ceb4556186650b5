"""The task store: every state change of a task is one transaction here, stamped with its time.

Ownership: a worker claims a task (worker_id, lease, attempts); from then on only that worker moves it
forward, and every call it makes checks it still owns the task (TaskLost otherwise). A task whose
worker died (its lease ran out, or its worker restarted under the same id) is requeued
`requeue_limit` times, then failed with the reason.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import string
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, false, func, or_, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from server.store.db import Database
from server.store.models import (
    ACCEPT,
    ACTIVE,
    CANCEL,
    POSTPROCESS_END,
    QUEUED,
    RUNNING,
    STAMPS,
    TERMINAL,
    Output,
    Task,
    TaskEvent,
    Upload,
    Worker,
)

_TOKEN_ALPHABET = string.ascii_letters + string.digits
_TASKS, _OUTPUTS = Task.__table__, Output.__table__
_TASK_BY_ID = select(_TASKS).where(_TASKS.c.id == bindparam("id"))
_TASK_BY_TOKEN = select(_TASKS).where(_TASKS.c.socketaccesstoken == bindparam("token"))
_ACTIVE_OF_OWNER = select(func.count()).select_from(_TASKS).where(
    _TASKS.c.owner == bindparam("owner"), _TASKS.c.status.in_(ACTIVE))
_OUTPUTS_OF_TASK = select(_OUTPUTS).where(_OUTPUTS.c.task_id == bindparam("task_id")).order_by(_OUTPUTS.c.name)


def new_token(length: int = 30) -> str:
    """A socket access token: `length` random letters and digits from the OS's cryptographic source."""
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(length))


def new_id() -> str:
    return uuid.uuid4().hex


class TaskLost(Exception):
    """The worker no longer owns the task (it was requeued, failed or cancelled behind its back)."""


class TaskKilled(TaskLost):
    """A kill was asked while the worker was finishing: the task ends in task_cancel, not with outputs."""


class QueueFull(Exception):
    pass


class TooManyActive(Exception):
    """The API key already has its most tasks between task_queue and a terminal status."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(
            f"Too many active tasks for this API key: {active} are queued or running and the limit is {limit} per "
            "key on this server. Wait for one to finish (or cancel or kill one), then try again."
        )
        self.active, self.limit = active, limit


WAITING_NOTE = "Waiting in the queue:"
"""How a queued task's debugoutput starts while every worker is paused (see TaskStore.note_waiting)."""

_ACTIVE_LOCK_NAMESPACE = 7_301_244_191
"""With a hash of the API key, the PostgreSQL advisory lock that makes one key's Runs count and insert in turn."""


def _key_lock(owner: str) -> int:
    """A 63-bit lock id for one API key (two keys sharing one only wait for each other)."""
    digest = hashlib.sha256(f"{_ACTIVE_LOCK_NAMESPACE}:{owner}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class NewUpload:
    id: str
    name: str
    contenttype: str
    data: bytes


@dataclass(frozen=True)
class NewOutput:
    name: str
    contenttype: str
    size: int
    path: str


@dataclass(frozen=True)
class KillOutcome:
    task: Task | None
    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class Recovered:
    task_id: int
    action: str  # requeued, failed, cancelled
    worker_id: str | None


def parameters_of(task: Task | Row) -> dict[str, Any]:
    return json.loads(task.parameters or "{}")


class TaskStore:
    def __init__(
        self,
        db: Database,
        *,
        lease_seconds: float = 60.0,
        requeue_limit: int = 1,
        max_queue_length: int = 1000,
        max_active_per_key: int = 0,
        callback_attempts: int = 5,
        callback_backoff_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self.requeue_limit = requeue_limit
        self.max_queue_length = max_queue_length
        self.max_active_per_key = max_active_per_key
        """Most tasks one API key may have between task_queue and a terminal status (0: no limit)."""
        self.callback_attempts = callback_attempts
        self.callback_backoff_seconds = callback_backoff_seconds
        self.clock = clock

    @classmethod
    def from_settings(cls, db: Database, settings: Any) -> TaskStore:
        return cls(
            db,
            lease_seconds=settings.lease_seconds,
            requeue_limit=settings.requeue_limit,
            max_queue_length=settings.max_queue_length,
            max_active_per_key=getattr(settings, "max_active_tasks_per_key", 0),
            callback_attempts=settings.callback_attempts,
            callback_backoff_seconds=settings.callback_backoff_seconds,
        )

    # --- creating and reading ------------------------------------------------------------------

    def create(
        self,
        *,
        parameters: dict[str, Any],
        image_url: str,
        upload_id: str | None = None,
        new_upload: NewUpload | None = None,
        callback_url: str = "",
        owner: str | None = None,
    ) -> Task:
        """A queued task. Its image is fetched from `image_url` by the worker, or read from the store when
        `upload_id` names an upload (`new_upload`: one sent with this request, stored with the task).
        QueueFull when the queue is full; TooManyActive when `owner` has `max_active_per_key` active tasks."""
        if new_upload is not None:
            upload_id = new_upload.id
        now = self.clock()
        with self.db.session(write=True) as s:
            if owner is not None and self.max_active_per_key:
                self._check_active(s, owner)
            queued = s.scalar(select(func.count()).select_from(Task).where(Task.status == QUEUED)) or 0
            if queued >= self.max_queue_length:
                raise QueueFull(
                    f"The queue is full ({queued} of at most {self.max_queue_length} tasks waiting); try again later."
                )
            task = Task(
                uuid=str(uuid.uuid4()),
                socketaccesstoken=new_token(),
                owner=owner,
                status=QUEUED,
                parameters=json.dumps(parameters),
                image_url=image_url,
                upload_id=upload_id,
                callbackurl=callback_url or "",
                debugoutput=self._waiting_note(s, now),
                debugerror="",
                pexit="0",
                totalcost=0.0,
                kill_requested=False,
                createtime=now,
                attempts=0,
                callback_state="",
                callback_attempts=0,
            )
            s.add(task)
            s.flush()
            if new_upload is not None:
                s.add(_upload_row(new_upload, owner, now, task_id=task.id))
            _event(s, task.id, QUEUED, now)
        return task

    def _check_active(self, s: Session, owner: str) -> None:
        """TooManyActive when `owner` is at its limit. Counted in this write transaction, which creates the task
        too, and taken in turn per key (SQLite: the database's write lock; PostgreSQL: an advisory lock held to
        commit, so the count sees the task the previous Run of this key made, whichever API process made it)."""
        if self.db.is_postgres:
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _key_lock(owner)})
        active = s.scalar(_ACTIVE_OF_OWNER, {"owner": owner}) or 0
        if active >= self.max_active_per_key:
            raise TooManyActive(active, self.max_active_per_key)

    def active_count(self, owner: str) -> int:
        """How many of `owner`'s tasks are between task_queue and a terminal status."""
        with self.db.session() as s:
            return s.scalar(_ACTIVE_OF_OWNER, {"owner": owner}) or 0

    def get(self, task_id: int, owner: str | None = None) -> Task | None:
        with self.db.session() as s:
            return _owned_by(s.get(Task, task_id), owner)

    def find(self, taskid: str | None = None, token: str | None = None, owner: str | None = None) -> Row | None:
        """By id, by token, or by both (then both must match). Tasks of other API keys are not found.
        The answer is a row with the task's columns as attributes (read-only)."""
        found = self.find_with_outputs(taskid, token, owner, outputs=False)
        return found[0] if found else None

    def find_with_outputs(
        self, taskid: str | None = None, token: str | None = None, owner: str | None = None, outputs: bool = True
    ) -> tuple[Row, list[Row]] | None:
        """`find`, and the task's outputs read in the same transaction: Task/Detail's read, the hottest path
        (prebuilt Core statements, no ORM objects)."""
        if taskid is not None:
            if not taskid.isdigit() or len(taskid) > 18:
                return None
            stmt, params = _TASK_BY_ID, {"id": int(taskid)}
        elif token is not None:
            stmt, params = _TASK_BY_TOKEN, {"token": token}
        else:
            return None
        with self.db.connect() as conn:
            task = conn.execute(stmt, params).first()
            if task is None or (token is not None and task.socketaccesstoken != token):
                return None
            if owner is not None and task.owner != owner:
                return None
            if not outputs:
                return task, []
            return task, list(conn.execute(_OUTPUTS_OF_TASK, {"task_id": task.id}))

    def list(
        self, owner: str | None = None, start: int = 0, limit: int = 20, *, ascending: bool = False
    ) -> tuple[int, list[Task]]:
        """Newest first (oldest first when `ascending`)."""
        with self.db.session() as s:
            where = [] if owner is None else [Task.owner == owner]
            total = s.scalar(select(func.count()).select_from(Task).where(*where)) or 0
            order = Task.id.asc() if ascending else Task.id.desc()
            rows = s.scalars(select(Task).where(*where).order_by(order).offset(start).limit(limit))
            return total, list(rows)

    def outputs(self, task_ids: Iterable[int]) -> dict[int, list[Output]]:
        ids = list(task_ids)
        found: dict[int, list[Output]] = {i: [] for i in ids}
        if not ids:
            return found
        with self.db.session() as s:
            for out in s.scalars(select(Output).where(Output.task_id.in_(ids)).order_by(Output.name)):
                found[out.task_id].append(out)
        return found

    def events(self, task_id: int) -> list[TaskEvent]:
        with self.db.session() as s:
            return list(s.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)))

    def count(self, status: str | None = None) -> int:
        with self.db.session() as s:
            stmt = select(func.count()).select_from(Task)
            if status is not None:
                stmt = stmt.where(Task.status == status)
            return s.scalar(stmt) or 0

    # --- uploads -------------------------------------------------------------------------------

    def add_upload(self, upload: NewUpload, owner: str | None = None) -> Upload:
        with self.db.session(write=True) as s:
            row = _upload_row(upload, owner, self.clock())
            s.add(row)
        return row

    def get_upload(self, upload_id: str) -> Upload | None:
        with self.db.session() as s:
            return s.get(Upload, upload_id)

    # --- the API's controls ----------------------------------------------------------------------

    def cancel_if_queued(self, task_id: int) -> tuple[Task | None, bool]:
        """Cancel a task that no worker has claimed yet. (task, True) if cancelled now."""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = s.get(Task, task_id, with_for_update=True)
            if task is None or task.status != QUEUED:
                return task, False
            _set_status(s, task, CANCEL, now, message="cancelled while queued")
            task.debugoutput = "Task cancelled while queued."
            return task, True

    def request_kill(self, task_id: int) -> KillOutcome:
        """Kill a running task now: it is task_cancel (endtime, canceltime set, no cost) when this returns, as
        Task/Kill answers. Its worker sees the flag within one transformer block and throws the run away; it
        can no longer record outputs (see `complete`)."""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = s.get(Task, task_id, with_for_update=True)
            if task is None:
                return KillOutcome(None, False, "There is no task yet.")
            if task.status == QUEUED:
                return KillOutcome(task, False, "it is still queued; use Task/Cancel to remove a queued task.")
            if task.status in TERMINAL:
                return KillOutcome(task, False, f"it has already ended ({task.status}).")
            task.kill_requested = True
            task.debugoutput = f"Task killed by request at {task.status}."
            task.totalcost = 0.0
            _set_status(s, task, CANCEL, now, message="killed by request")
            return KillOutcome(task, True)

    def delete_files(self, task_id: int) -> list[str]:
        """Drop the output rows and the task's uploaded input; answers the output paths to remove."""
        with self.db.session(write=True) as s:
            paths = list(s.scalars(select(Output.path).where(Output.task_id == task_id)))
            s.execute(delete(Output).where(Output.task_id == task_id))
            s.execute(delete(Upload).where(Upload.task_id == task_id))
        return paths

    # --- the worker's side -----------------------------------------------------------------------

    def claim_next(self, worker_id: str) -> Task | None:
        """The oldest queued task, now owned by `worker_id` (status task_accept), or None.

        One statement decides the claim: on PostgreSQL the candidate row is locked with
        FOR UPDATE SKIP LOCKED (other workers take the next one); on SQLite the write lock is held
        from BEGIN IMMEDIATE and the UPDATE re-checks the status, so no two processes get one task.
        """
        now = self.clock()
        with self.db.session(write=True) as s:
            oldest = select(Task.id).where(Task.status == QUEUED).order_by(Task.id).limit(1)
            if self.db.is_postgres:
                oldest = oldest.with_for_update(skip_locked=True)
            claimed = s.execute(
                update(Task)
                .where(Task.id == oldest.scalar_subquery(), Task.status == QUEUED)
                .values(
                    status=ACCEPT,
                    accepttime=now,
                    worker_id=worker_id,
                    lease_expires_at=now + self.lease_seconds,
                    attempts=Task.attempts + 1,
                )
                .returning(Task.id)
                .execution_options(synchronize_session=False)
            ).scalar()
            if claimed is None:
                return None
            _event(s, claimed, ACCEPT, now, f"worker {worker_id}")
            s.execute(update(Worker).where(Worker.id == worker_id).values(task_id=claimed, state="busy"))
            return s.get(Task, claimed)

    def advance(
        self,
        task_id: int,
        worker_id: str,
        status: str,
        *,
        debugoutput: str | None = None,
        parameters: dict[str, Any] | None = None,
        message: str = "",
        claimed_attempt: int | None = None,
    ) -> bool:
        """Move an owned task to `status` (stamping its time, renewing the lease). True if a kill was asked.
        `claimed_attempt`: the worker has finished the video and takes the task back if it lost it (`_owned`)."""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = self._owned(s, task_id, worker_id, claimed_attempt)
            if status != task.status or message:
                _set_status(s, task, status, now, message=message)
            task.lease_expires_at = now + self.lease_seconds
            if debugoutput is not None:
                task.debugoutput = debugoutput
            if parameters is not None:
                task.parameters = json.dumps(parameters)
            return task.kill_requested

    def kill_requested(self, task_id: int) -> bool:
        with self.db.session() as s:
            return bool(s.scalar(select(Task.kill_requested).where(Task.id == task_id)))

    def complete(
        self, task_id: int, worker_id: str, outputs: list[NewOutput], *, totalcost: float, debugoutput: str,
        claimed_attempt: int | None = None,
    ) -> Task:
        """Success: outputs recorded and task_postprocess_end with pexit 0, in one transaction.

        With `claimed_attempt`, a finished video is recorded even if its lease ran out meanwhile (see `_owned`)."""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = self._owned(s, task_id, worker_id, claimed_attempt)
            if task.kill_requested:
                raise TaskKilled(f"task {task_id} was killed while finishing")
            parent = uuid.uuid5(uuid.NAMESPACE_URL, task.uuid).hex
            for out in outputs:
                s.add(Output(
                    id=new_id(), task_id=task.id, name=out.name, contenttype=out.contenttype, parentid=parent,
                    size=out.size, addedtime=now, modifiedtime=now, accesskey=new_token(), path=out.path,
                ))
            task.pexit = "0"
            task.totalcost = totalcost
            task.debugoutput = debugoutput
            _set_status(s, task, POSTPROCESS_END, now, message="pexit 0")
            return task

    def finish_killed(self, task_id: int, worker_id: str, note: str) -> Task:
        """The worker has stopped a killed run: say where in debugoutput. (A kill found while the task is still
        running, e.g. from an older API process, ends it in task_cancel here.)"""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = s.get(Task, task_id, with_for_update=True)
            if task is None or task.worker_id != worker_id or not task.kill_requested:
                raise TaskLost(f"task {task_id} is not a task killed while {worker_id} held it")
            task.debugoutput = note
            task.totalcost = 0.0
            if task.status != CANCEL:
                _set_status(s, task, CANCEL, now, message=note)
            return task

    def fail(self, task_id: int, reason: str, worker_id: str | None = None, pexit: str = "1") -> Task | None:
        """End a task in task_postprocess_end with pexit != 0, the reason in debugerror, no cost.
        With `worker_id`, only if that worker still owns it; without, from any non-terminal status."""
        now = self.clock()
        with self.db.session(write=True) as s:
            if worker_id is not None:
                task = self._owned(s, task_id, worker_id)
            else:
                task = s.get(Task, task_id, with_for_update=True)
                if task is None or task.status in TERMINAL:
                    return None
            task.pexit = pexit
            task.debugerror = reason
            task.totalcost = 0.0
            _set_status(s, task, POSTPROCESS_END, now, message=f"pexit {pexit}: {reason}")
            return task

    def release(self, task_id: int, worker_id: str, note: str) -> None:
        """Give an owned task back to the queue on a graceful stop; that attempt does not count."""
        now = self.clock()
        with self.db.session(write=True) as s:
            try:
                task = self._owned(s, task_id, worker_id)
            except TaskLost:
                return
            task.attempts = max(0, task.attempts - 1)
            _requeue(s, task, now, note)

    def recover_orphans(self, *, worker_id: str | None = None, now: float | None = None) -> list[Recovered]:
        """Tasks whose worker is gone: all running tasks held under `worker_id` (a worker restarting under
        its own id knows its previous life is over) and every running task whose lease has run out.
        Each is requeued while its attempts are within `requeue_limit`, else failed with the reason;
        one that was being killed is cancelled."""
        now = self.clock() if now is None else now
        found: list[Recovered] = []
        with self.db.session(write=True) as s:
            stmt = select(Task).where(
                Task.status.in_(RUNNING),
                or_(Task.lease_expires_at < now, Task.worker_id == worker_id if worker_id else false()),
            ).order_by(Task.id)
            if self.db.is_postgres:
                stmt = stmt.with_for_update(skip_locked=True)
            for task in s.scalars(stmt):
                dead = task.worker_id
                where = f"worker {dead} stopped while the task was in {task.status}"
                if task.kill_requested:
                    task.debugoutput = f"Task killed; {where}."
                    _set_status(s, task, CANCEL, now, message=where)
                    found.append(Recovered(task.id, "cancelled", dead))
                elif task.attempts <= self.requeue_limit:
                    _requeue(s, task, now, f"requeued: {where} (attempt {task.attempts})")
                    found.append(Recovered(task.id, "requeued", dead))
                else:
                    reason = (
                        f"The task was lost: {where} (attempt {task.attempts}); it had been requeued "
                        f"{self.requeue_limit} time(s) already and is not retried again."
                    )
                    task.pexit = "1"
                    task.debugerror = reason
                    task.totalcost = 0.0
                    _set_status(s, task, POSTPROCESS_END, now, message=f"pexit 1: {reason}")
                    found.append(Recovered(task.id, "failed", dead))
        return found

    def _owned(self, s: Session, task_id: int, worker_id: str, claimed_attempt: int | None = None) -> Task:
        """The task, locked, if `worker_id` owns it; TaskLost otherwise.

        With `claimed_attempt` (the task's attempts when this worker claimed it; given once its video is made),
        a task lost only to its lease is taken back: its lease ran out while the store was unreachable (the
        heartbeats could not be written) and it was requeued, or even claimed by another worker since, which
        then finds it gone at its next write. So a finished video is recorded, not made again. A task that has
        ended (or was claimed before this worker's claim) is not: a result lands exactly once."""
        task = s.get(Task, task_id, with_for_update=True)
        if task is not None and task.worker_id == worker_id and task.status == CANCEL and task.kill_requested:
            raise TaskKilled(f"task {task_id} was killed by request")
        if task is not None and task.worker_id == worker_id and task.status in RUNNING:
            return task
        if (claimed_attempt is not None and task is not None and task.status not in TERMINAL
                and task.attempts >= claimed_attempt):
            if task.status not in RUNNING:
                task.accepttime = task.accepttime or self.clock()
            task.worker_id = worker_id
            task.lease_expires_at = self.clock() + self.lease_seconds
            return task
        state = "gone" if task is None else f"{task.status}, worker {task.worker_id}"
        raise TaskLost(f"task {task_id} is no longer owned by {worker_id} ({state})")

    # --- workers ---------------------------------------------------------------------------------

    def register_worker(
        self, worker_id: str, *, pid: int, model: str, device: str, state: str, detail: str = "", version: str = ""
    ) -> None:
        now = self.clock()
        with self.db.session(write=True) as s:
            row = s.get(Worker, worker_id) or Worker(id=worker_id, started_at=now)
            row.state, row.pid, row.model, row.device, row.detail = state, pid, model, device, detail
            row.version = version
            row.started_at, row.heartbeat_at, row.task_id = now, now, None
            s.add(row)

    def worker_state(self, worker_id: str, state: str, detail: str | None = None, task_id: int | None = None) -> None:
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

    def _waiting_note(self, s: Session, now: float) -> str:
        """Why a queued task waits when every live worker (its heartbeat within one lease) is paused, e.g. for disk
        space; "" otherwise (some worker will take it, or none is alive to say)."""
        alive = [w for w in s.scalars(select(Worker).order_by(Worker.id))
                 if w.state not in ("stopped", "failed") and self.heartbeat_fresh(w, now)]
        if not alive or any(w.state != "paused" for w in alive):
            return ""
        first = alive[0]
        more = f" (and {len(alive) - 1} more)" if len(alive) > 1 else ""
        return (f"{WAITING_NOTE} every worker is paused, so no task starts until one can go on. "
                f"{first.id}{more}: {first.detail or 'paused'}")

    def note_waiting(self) -> int:
        """Bring queued tasks' debugoutput in line with the workers (a worker calls it when it pauses or goes on):
        the waiting note on those that have nothing else to say, or the note taken off. Answers how many changed."""
        now = self.clock()
        with self.db.session(write=True) as s:
            note = self._waiting_note(s, now)
            queued = Task.status == QUEUED
            noted = Task.debugoutput.startswith(WAITING_NOTE)
            stmt = update(Task).where(queued, or_(Task.debugoutput == "", noted)) if note \
                else update(Task).where(queued, noted)
            done = s.execute(stmt.values(debugoutput=note).execution_options(synchronize_session=False))
            return done.rowcount or 0

    def workers(self) -> list[Worker]:
        with self.db.session() as s:
            return list(s.scalars(select(Worker).order_by(Worker.id)))

    def heartbeat_fresh(self, worker: Worker, now: float) -> bool:
        """The worker beat within one lease (it beats 4 times a lease): its process is alive."""
        return now - worker.heartbeat_at <= self.lease_seconds

    # --- callbacks -------------------------------------------------------------------------------

    def claim_due_callbacks(self, limit: int = 16, hold_seconds: float = 60.0) -> list[int]:
        """Tasks whose callback is due now; held for `hold_seconds` so no other process sends it too."""
        now = self.clock()
        with self.db.session(write=True) as s:
            stmt = (
                select(Task)
                .where(Task.callback_state == "pending", Task.callback_next_at <= now)
                .order_by(Task.callback_next_at)
                .limit(limit)
            )
            if self.db.is_postgres:
                stmt = stmt.with_for_update(skip_locked=True)
            tasks = list(s.scalars(stmt))
            for task in tasks:
                task.callback_next_at = now + hold_seconds
            return [t.id for t in tasks]

    def record_callback(self, task_id: int, delivered: bool) -> tuple[str, int, float | None]:
        """Count one attempt; answers (state, attempts, next attempt time or None)."""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = s.get(Task, task_id, with_for_update=True)
            if task is None:
                return "failed", 0, None
            task.callback_attempts += 1
            if delivered:
                task.callback_state, task.callback_next_at = "delivered", None
            elif task.callback_attempts >= self.callback_attempts:
                task.callback_state, task.callback_next_at = "failed", None
            else:
                wait = self.callback_backoff_seconds * 2 ** (task.callback_attempts - 1)
                task.callback_next_at = now + wait
            return task.callback_state, task.callback_attempts, task.callback_next_at

    # --- live progress and metrics (read only) ----------------------------------------------------

    def task_events_after(self, task_id: int, after_id: int = 0) -> list[TaskEvent]:
        """One task's events newer than `after_id`, in order: what a live follower has not sent yet.
        One worker writes a task's events one committed transaction at a time, so ids never go back."""
        with self.db.session() as s:
            stmt = select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.id > after_id)
            return list(s.scalars(stmt.order_by(TaskEvent.id)))

    def events_after(self, after_id: int, limit: int, also_ids: Iterable[int] = ()) -> list[TaskEvent]:
        """All tasks' events newer than `after_id` (at most `limit`), plus any of `also_ids` (ids a reader
        saw skipped, which a slower transaction may have committed since), in id order."""
        wanted = TaskEvent.id > after_id
        extra = list(also_ids)
        if extra:
            wanted = or_(wanted, TaskEvent.id.in_(extra))
        with self.db.session() as s:
            return list(s.scalars(select(TaskEvent).where(wanted).order_by(TaskEvent.id).limit(limit)))

    def status_counts(self) -> dict[tuple[str, str], int]:
        """How many tasks are in each (status, pexit) now: one grouped count, for metrics at scrape time."""
        with self.db.session() as s:
            rows = s.execute(select(Task.status, Task.pexit, func.count()).group_by(Task.status, Task.pexit))
            return {(status, pexit): count for status, pexit, count in rows}


def _owned_by(task: Task | None, owner: str | None) -> Task | None:
    if task is None or (owner is not None and task.owner != owner):
        return None
    return task


def _upload_row(upload: NewUpload, owner: str | None, now: float, task_id: int | None = None) -> Upload:
    return Upload(
        id=upload.id, name=upload.name, contenttype=upload.contenttype, size=len(upload.data), data=upload.data,
        addedtime=now, accesskey=new_token(), owner=owner, task_id=task_id,
    )


def _event(s: Session, task_id: int, status: str, at: float, message: str = "") -> None:
    s.add(TaskEvent(task_id=task_id, status=status, at=at, message=message))


def _set_status(s: Session, task: Task, status: str, now: float, message: str = "") -> None:
    task.status = status
    stamp = STAMPS.get(status)
    if stamp is not None:
        setattr(task, stamp, now)
    if status == CANCEL:
        task.endtime = now  # a cancelled or killed task has ended too (canceltime says how)
    if status in TERMINAL:
        task.lease_expires_at = None
        if task.callbackurl:
            task.callback_state, task.callback_next_at = "pending", now
    _event(s, task.id, status, now, message)


def _requeue(s: Session, task: Task, now: float, note: str) -> None:
    for stamp in STAMPS.values():
        setattr(task, stamp, 0.0)
    task.worker_id = None
    task.lease_expires_at = None
    task.debugoutput = note
    _set_status(s, task, QUEUED, now, message=note)
