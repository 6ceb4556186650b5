"""A task's lifecycle: every state change is one transaction here, stamped with its time.

Ownership: a worker claims a task (worker_id, lease, attempts); from then on only that worker moves it forward,
and every call it makes checks it still owns the task (TaskLost otherwise). A task whose worker died (its lease
ran out, or its worker restarted under the same id) is requeued `requeue_limit` times, then failed with the
reason. The API's controls end a task from outside: Cancel while it is queued, Kill while it runs.

Once its video is made a task is finished, not made again: its status only moves forward (a worker's step never
takes it back, a graceful release is refused), and of two workers holding a finished video of it (one whose lease
ran out during an outage, one that took the requeued task up) the first to record it wins; the other cannot
record over it (see `_owned`).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import false, func, or_, select, text, update
from sqlalchemy.orm import Session

from pipeline.params import GenerationParams
from server.store.db import Database
from server.store.errors import NoWorker, QueueFull, TaskKilled, TaskLost, TooManyActive
from server.store.ids import new_id, new_token
from server.store.models import (
    ACCEPT,
    CANCEL,
    FINISHING,
    OUTPUT,
    POSTPROCESS_END,
    POSTPROCESS_START,
    QUEUED,
    RUNNING,
    TERMINAL,
    Output,
    Task,
    Worker,
)
from server.store.reads import ACTIVE_OF_OWNER
from server.store.transitions import add_event, is_before, requeue, say, set_status, show_progress
from server.store.uploads import NewUpload, upload_row
from server.store.waiting import WAITING_NOTE, no_worker_reason, waiting_note
from server.task_record import TaskRecord

log = logging.getLogger("particalize.store")

_ACTIVE_LOCK_NAMESPACE = 7_301_244_191
"""With a hash of the API key, the PostgreSQL advisory lock that makes one key's Runs count and insert in turn."""


def _key_lock(owner: str) -> int:
    """A 63-bit lock id for one API key (two keys sharing one only wait for each other)."""
    digest = hashlib.sha256(f"{_ACTIVE_LOCK_NAMESPACE}:{owner}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


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


class TaskLifecycle:
    def __init__(
        self,
        db: Database,
        *,
        lease_seconds: float = 60.0,
        requeue_limit: int = 1,
        max_queue_length: int = 1000,
        max_active_per_key: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self.requeue_limit = requeue_limit
        self.max_queue_length = max_queue_length
        self.max_active_per_key = max_active_per_key
        self.clock = clock
        self.changed: list[Callable[[int, str], None]] = []
        """Told (task id, status) after a Run's task is queued, a Kill is committed, or a task ends (a terminal status,
        committed by this process): `serve` wakes its own workers with the first two on SQLite (server/wakeup.py),
        and the callback sender looks for due callbacks on the last (server/callbacks.py); a worker process started
        by `serve` passes its tasks' ends on to it (server/worker_reports.py). PostgreSQL announces new statuses
        itself (server/store/notify.py)."""

    # --- into the queue and out of it ------------------------------------------------------------

    def create(self, record: TaskRecord, new_upload: NewUpload | None = None) -> Task:
        """A queued task. Its image is fetched from the record's URL by the worker, or read from the store when
        the record names an upload (`new_upload`: one sent with this request, stored with the task).
        QueueFull when the queue is full; TooManyActive when its owner has `max_active_per_key` active tasks;
        NoWorker when no worker can serve it (every registered worker failed to load its model, none is alive)."""
        now = self.clock()
        with self.db.session(write=True) as s:
            reason = no_worker_reason(list(s.scalars(select(Worker).order_by(Worker.id))), now, self.lease_seconds)
            if reason:
                raise NoWorker(f"{reason} No task is queued until a worker can serve; the operator must fix the "
                               "worker's configuration and start it again.")
            if record.owner is not None and self.max_active_per_key:
                self._check_active(s, record.owner)
            queued = s.scalar(select(func.count()).select_from(Task).where(Task.status == QUEUED)) or 0
            if queued >= self.max_queue_length:
                raise QueueFull(
                    f"The queue is full ({queued} of at most {self.max_queue_length} tasks waiting); try again later."
                )
            task = Task(
                uuid=str(uuid.uuid4()),
                socketaccesstoken=new_token(),
                owner=record.owner,
                status=QUEUED,
                request=record.model_dump(mode="json"),
                debugoutput=waiting_note(s, now, self.lease_seconds),
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
                s.add(upload_row(new_upload, record.owner, now, task_id=task.id))
            add_event(s, task.id, QUEUED, now)
        self._tell(task.id, QUEUED)
        return task

    def _tell(self, task_id: int, status: str) -> None:
        """After the commit: whoever listens (`changed`) is told; a listener's failure is no failure of the call."""
        for listener in self.changed:
            try:
                listener(task_id, status)
            except Exception:
                log.exception("could not tell of task %s reaching %s", task_id, status)

    def _check_active(self, s: Session, owner: str) -> None:
        """TooManyActive when `owner` is at its limit. Counted in this write transaction, which creates the task
        too, and taken in turn per key (SQLite: the database's write lock; PostgreSQL: an advisory lock held to
        commit, so the count sees the task the previous Run of this key made, whichever API process made it)."""
        if self.db.is_postgres:
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _key_lock(owner)})
        active = s.scalar(ACTIVE_OF_OWNER, {"owner": owner}) or 0
        if active >= self.max_active_per_key:
            raise TooManyActive(active, self.max_active_per_key)

    def note_waiting(self) -> int:
        """Bring queued tasks' debugoutput in line with the workers (a worker calls it when it pauses or goes on):
        the waiting note on those that have nothing else to say, or the note taken off. Answers how many changed."""
        now = self.clock()
        with self.db.session(write=True) as s:
            note = waiting_note(s, now, self.lease_seconds)
            queued = Task.status == QUEUED
            noted = Task.debugoutput.startswith(WAITING_NOTE)
            stmt = update(Task).where(queued, or_(Task.debugoutput == "", noted)) if note \
                else update(Task).where(queued, noted)
            done = s.execute(stmt.values(debugoutput=note).execution_options(synchronize_session=False))
            return done.rowcount or 0

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
            add_event(s, claimed, ACCEPT, now, f"worker {worker_id}")
            s.execute(update(Worker).where(Worker.id == worker_id).values(task_id=claimed, state="busy"))
            return s.get(Task, claimed)

    # --- the worker's steps ----------------------------------------------------------------------

    def advance(
        self,
        task_id: int,
        worker_id: str,
        status: str,
        *,
        debugoutput: str | None = None,
        resolved: GenerationParams | None = None,
        recorded: dict[str, str] | None = None,
        claimed_attempt: int | None = None,
    ) -> bool:
        """Move an owned task forward to `status` (stamping its time, renewing the lease); a task already there
        or further (a retry whose first answer was lost) keeps its status. True if a kill was asked.
        `resolved`: the parameters the run uses. `recorded`: what the run recorded beyond them (cached mode: the steps
        computed and skipped), kept with them and shown in `parameters`. `claimed_attempt`: the worker has finished
        the video and takes the task back if it lost it (`_owned`)."""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = self._owned(s, task_id, worker_id, claimed_attempt, reaching=status)
            if is_before(task.status, status):
                set_status(s, task, status, now)
            task.lease_expires_at = now + self.lease_seconds
            if debugoutput is not None:
                say(task, debugoutput)
            if resolved is not None:
                task.resolved = resolved.model_dump(mode="json")
            if recorded:
                task.resolved = {**(task.resolved or {}), "recorded": dict(recorded)}
            return task.kill_requested

    def progress(self, task_id: int, worker_id: str, step: int, total: int, elapsed: float) -> bool:
        """A denoising step done (task_output, one event per call): the numbers debugoutput and the live progress
        are rendered from. True if a kill was asked."""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = self._owned(s, task_id, worker_id)
            if not is_before(OUTPUT, task.status):  # never back from a finishing status
                set_status(s, task, OUTPUT, now, message=f"step {step}/{total}", step=step, total=total)
            task.lease_expires_at = now + self.lease_seconds
            show_progress(task, step, total, elapsed)
            return task.kill_requested

    def kill_requested(self, task_id: int) -> bool:
        with self.db.session() as s:
            return bool(s.scalar(select(Task.kill_requested).where(Task.id == task_id)))

    # --- how a run ends --------------------------------------------------------------------------

    def complete(
        self, task_id: int, worker_id: str, outputs: list[NewOutput], *, totalcost: float, debugoutput: str,
        claimed_attempt: int | None = None,
    ) -> Task:
        """Success: outputs recorded and task_postprocess_end with pexit 0, in one transaction. The first record
        wins: a task that has ended is never recorded over (TaskLost), except that this worker's own retry of
        this call (its first answer lost in an outage, the task already done by this worker) returns the task.

        With `claimed_attempt`, a finished video is recorded even if its lease ran out meanwhile (see `_owned`)."""
        now = self.clock()
        with self.db.session(write=True) as s:
            done = s.get(Task, task_id, with_for_update=True)
            if done is not None and done.worker_id == worker_id and done.status == POSTPROCESS_END \
                    and done.pexit == "0":
                return done
            task = self._owned(s, task_id, worker_id, claimed_attempt, reaching=POSTPROCESS_END)
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
            say(task, debugoutput)
            set_status(s, task, POSTPROCESS_END, now, message="pexit 0")
        self._tell(task_id, POSTPROCESS_END)
        return task

    def finish_killed(self, task_id: int, worker_id: str, note: str) -> Task:
        """The worker has stopped a killed run: say where in debugoutput. (A kill found while the task is still
        running, e.g. from an older API process, ends it in task_cancel here.)"""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = s.get(Task, task_id, with_for_update=True)
            if task is None or task.worker_id != worker_id or not task.kill_requested:
                raise TaskLost(f"task {task_id} is not a task killed while {worker_id} held it")
            say(task, note)
            task.totalcost = 0.0
            ended = task.status != CANCEL
            if ended:
                set_status(s, task, CANCEL, now, message=note)
        if ended:
            self._tell(task_id, CANCEL)
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
            set_status(s, task, POSTPROCESS_END, now, message=f"pexit {pexit}: {reason}")
        self._tell(task_id, POSTPROCESS_END)
        return task

    def release(self, task_id: int, worker_id: str, note: str) -> bool:
        """Give an owned task back to the queue on a graceful stop; that attempt does not count. Refused (False)
        for a task that is no longer this worker's, and for one whose video is made (a finishing status): that
        one is recorded, never sent back to be made again."""
        now = self.clock()
        with self.db.session(write=True) as s:
            try:
                task = self._owned(s, task_id, worker_id)
            except TaskLost:
                return False
            if task.status in FINISHING:
                return False
            task.attempts = max(0, task.attempts - 1)
            requeue(s, task, now, note)
            return True

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
                    say(task, f"Task killed; {where}.")
                    set_status(s, task, CANCEL, now, message=where)
                    found.append(Recovered(task.id, "cancelled", dead))
                elif task.attempts <= self.requeue_limit:
                    requeue(s, task, now, f"requeued: {where} (attempt {task.attempts})")
                    found.append(Recovered(task.id, "requeued", dead))
                else:
                    reason = (
                        f"The task was lost: {where} (attempt {task.attempts}); it had been requeued "
                        f"{self.requeue_limit} time(s) already and is not retried again."
                    )
                    task.pexit = "1"
                    task.debugerror = reason
                    task.totalcost = 0.0
                    set_status(s, task, POSTPROCESS_END, now, message=f"pexit 1: {reason}")
                    found.append(Recovered(task.id, "failed", dead))
        for item in found:
            if item.action != "requeued":
                self._tell(item.task_id, CANCEL if item.action == "cancelled" else POSTPROCESS_END)
        return found

    # --- the API's controls ----------------------------------------------------------------------

    def cancel_if_queued(self, task_id: int) -> tuple[Task | None, bool]:
        """Cancel a task that no worker has claimed yet. (task, True) if cancelled now."""
        now = self.clock()
        with self.db.session(write=True) as s:
            task = s.get(Task, task_id, with_for_update=True)
            if task is None or task.status != QUEUED:
                return task, False
            set_status(s, task, CANCEL, now, message="cancelled while queued")
            say(task, "Task cancelled while queued.")
        self._tell(task_id, CANCEL)
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
            say(task, f"Task killed by request at {task.status}.")
            task.totalcost = 0.0
            set_status(s, task, CANCEL, now, message="killed by request")
        self._tell(task.id, CANCEL)
        return KillOutcome(task, True)

    # ---------------------------------------------------------------------------------------------

    def _owned(self, s: Session, task_id: int, worker_id: str, claimed_attempt: int | None = None,
               reaching: str = POSTPROCESS_END) -> Task:
        """The task, locked, if `worker_id` owns it; TaskLost otherwise.

        With `claimed_attempt` (the task's attempts when this worker claimed it; given once its video is made),
        a task lost only to its lease is taken back: its lease ran out while the store was unreachable (the
        heartbeats could not be written) and it was requeued, or even claimed by another worker since, which
        then finds it gone at its next write. So a finished video is recorded, not made again. It is taken back
        only from behind the status this worker is `reaching` and short of task_postprocess_start (where a run
        puts its video in the storage, under the task's one output name): the status never goes back, and a
        video another worker is storing is not recorded over. A task that has ended (or was claimed before this
        worker's claim) is not taken: a result lands exactly once."""
        task = s.get(Task, task_id, with_for_update=True)
        if task is not None and task.worker_id == worker_id and task.status == CANCEL and task.kill_requested:
            raise TaskKilled(f"task {task_id} was killed by request")
        if task is not None and task.worker_id == worker_id and task.status in RUNNING:
            return task
        bar = reaching if is_before(reaching, POSTPROCESS_START) else POSTPROCESS_START
        if (claimed_attempt is not None and task is not None and task.status not in TERMINAL
                and task.attempts >= claimed_attempt and is_before(task.status, bar)):
            if task.status not in RUNNING:
                task.accepttime = task.accepttime or self.clock()
            task.worker_id = worker_id
            task.lease_expires_at = self.clock() + self.lease_seconds
            return task
        state = "gone" if task is None else f"{task.status}, worker {task.worker_id}"
        raise TaskLost(f"task {task_id} is no longer owned by {worker_id} ({state})")
