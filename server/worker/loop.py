"""The claiming loop: one worker per GPU takes the oldest queued task, runs it (server/worker/task_run.py), and
takes the next; a heartbeat thread renews its lease meanwhile. Either way the model stays loaded.

A graceful stop (SIGTERM, see server/processes/shutdown.py) claims nothing more at once and lets the running task finish
within its grace period (past it the run is interrupted and requeued); then the loop ends. A store outage (see
server/store/outage.py) fails nothing: the loop claims nothing while it lasts, and the running task keeps what it
has made and records it when the store answers again; one log line when the outage starts, one when it ends. The
loop also claims nothing while its disks are below min_free_disk_bytes (state "paused", saying why), so no GPU
time is spent on a video that could not be written; it tells the serve process that started it too (`report`,
server/worker_reports.py), which /ready believes also when the store cannot be written.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from server.netguard import fetch_url
from server.storage import Storage, disk_space_problem
from server.store import Store
from server.store.models import Task
from server.store.outage import StoreHealth, is_outage
from server.wakeup import Polling, Wakeup
from server.worker.options import WorkerOptions
from server.worker.scratch import remove_abandoned
from server.worker.task_run import Fetch, Generator, TaskRun
from server.worker_reports import Report

log = logging.getLogger("particalize.worker")


class Worker:
    def __init__(
        self,
        store: Store,
        storage: Storage,
        generator: Generator,
        options: WorkerOptions,
        *,
        worker_id: str,
        fetch: Fetch = fetch_url,
        report: Report | None = None,
        wakeup: Wakeup | None = None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.generator = generator
        self.options = options
        self.worker_id = worker_id
        self.fetch = fetch
        self.stop_event = threading.Event()
        self._finished = threading.Event()
        self.current_task: int | None = None
        self.tasks_done = 0
        self.health = StoreHealth(log)
        self._state_lock = threading.Lock()  # the heartbeat's "stopping" mark never lands after the task's end
        self.paused_for: str | None = None
        self.report: Report = report or (lambda state, detail: None)
        """Tells the serve process that started this worker when it pauses and goes on."""
        self._state_unwritten = False
        """The store has not taken the last pause or resume yet (it could not be written): retried, quietly."""
        self._next_state_try = 0.0
        self.wakeup: Wakeup = wakeup or Polling(options.poll_seconds)
        """How it learns of a queued task or a kill: woken (PostgreSQL's notifications, serve's pipe), or polling."""

    @property
    def lease_seconds(self) -> float:
        return self.store.options.lease_seconds

    def run(self, stop_event: threading.Event, parent_pid: int | None = None) -> None:
        """Until `stop_event`: take the oldest queued task, do it, repeat (when idle, waiting for a wake-up or
        polling: server/wakeup.py). Once it is set no task is claimed; the running one goes on until the stop is
        due (see server/processes/shutdown.py)."""
        self.stop_event = stop_event
        self._finished.clear()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        remove_abandoned()
        self.recover(own=True)
        sweep_every = max(1.0, min(10.0, self.lease_seconds / 4))
        next_sweep = time.monotonic() + sweep_every
        look_at, woken = 0.0, True  # when it looks for a task by itself next; whether something says to look now
        while not stop_event.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.error("the serve process that started this worker is gone; exiting")
                os._exit(1)
            try:
                # Right after an outage, leases look expired only because no heartbeat could be written: give
                # every live worker one lease to renew its own before taking any task away from it.
                sweep_at = max(next_sweep, self.health.back_at + self.lease_seconds)
                requeued = 0
                if time.monotonic() >= sweep_at:
                    requeued = self.health.call(lambda: self.recover(own=False))
                    next_sweep = sweep_at = time.monotonic() + sweep_every
                worked = False
                if woken or requeued or time.monotonic() >= look_at:
                    self.wakeup.clear()  # a task queued from here on wakes the wait below
                    look_at = time.monotonic() + self.wakeup.idle_seconds()
                    # Paused, the worker touches the store only to record that (which may fail quietly): that is no
                    # news of the store's health, so it is not counted as such.
                    worked = False if self._paused() else self.health.call(self._claim_and_process)
            except SQLAlchemyError as exc:
                if not is_outage(exc):
                    log.exception("database error in the worker loop; retrying in 1 s")
                stop_event.wait(1.0)  # an outage was logged once by self.health; the next try is the probe
                woken = True
                continue
            # Woken (a task queued, the stop), or at its next own look or sweep, whichever comes first.
            woken = worked or self.wakeup.wait(max(0.0, min(look_at, sweep_at) - time.monotonic()), stop_event)
        self._finished.set()
        heartbeat.join(timeout=2)

    def recover(self, own: bool) -> int:
        """Requeue (or fail) tasks whose worker died: at start our own previous life's, then expired leases. Answers
        how many were requeued."""
        found = self.store.tasks.recover_orphans(worker_id=self.worker_id if own else None)
        for item in found:
            log.warning("task %s %s (it was held by %s, which stopped)", item.task_id, item.action, item.worker_id,
                        extra={"task_id": item.task_id})
        return sum(1 for item in found if item.action == "requeued")

    def run_once(self) -> bool:
        """Claim and do one task; False when the queue is empty or the disks are below their floor."""
        if self._paused():
            return False
        return self._claim_and_process()

    def _claim_and_process(self) -> bool:
        task = self.store.tasks.claim_next(self.worker_id)
        if task is None:
            return False
        self.current_task = task.id
        try:
            self.process(task)
        finally:
            self.tasks_done += 1
            with self._state_lock:
                self.current_task = None
                try:
                    self.health.call(lambda: self.store.workers.set_state(
                        self.worker_id, "stopping" if self.stop_event.is_set() else "ready"))
                except SQLAlchemyError as exc:
                    if not is_outage(exc):
                        log.exception("could not record the worker state")
        return True

    def process(self, task: Task) -> None:
        run = TaskRun(task, store=self.store, storage=self.storage, generator=self.generator, options=self.options,
                      worker_id=self.worker_id, health=self.health, stop_event=self.stop_event, fetch=self.fetch,
                      space_problem=self.resources_problem, kill_read_seconds=self.wakeup.kill_read_seconds)
        with self.wakeup.watching(task.id, run.kill_hint.set):
            run.execute()

    def resources_problem(self) -> str | None:
        """Why an output could not be written now (a disk below min_free_disk_bytes), or None. The message names
        no server path: a client reads it in debugerror."""
        needed = self.options.min_free_disk_bytes
        scratch = Path(tempfile.gettempdir())
        problem = disk_space_problem(scratch, needed, "the worker's temporary directory")
        return problem or self.storage.space_problem(needed)

    def _paused(self) -> bool:
        """Under the disk floor the worker claims nothing (state "paused", the reason in its detail, which /ready
        shows), and resumes by itself once there is room: one log line each way, and one report to the serve
        process, whether or not the store can take the new state now (SQLite on that very disk may not)."""
        problem = self.resources_problem()
        if (problem is None) != (self.paused_for is None):  # a change of state, not of the free bytes it names
            self.paused_for = problem
            if problem:
                log.warning("worker %s claims no task: %s", self.worker_id, problem)
            else:
                log.warning("worker %s has room to write outputs again; claiming tasks", self.worker_id)
            self.report(*self._pause_state())
            self._state_unwritten, self._next_state_try = True, 0.0
        if self._state_unwritten and time.monotonic() >= self._next_state_try:
            self._write_pause_state()
        return problem is not None

    def _pause_state(self) -> tuple[str, str]:
        if self.paused_for:
            return "paused", self.paused_for
        return ("stopping" if self.stop_event.is_set() else "ready"), ""

    def _write_pause_state(self) -> None:
        """Record the pause (or its end) and what it means for the queued tasks' debugoutput; while the store cannot
        be written, try again once a second (its outage is logged once, by self.health)."""
        state, detail = self._pause_state()
        try:
            self.health.call(lambda: self.store.workers.set_state(self.worker_id, state, detail=detail))
            self.health.call(self.store.tasks.note_waiting)
        except SQLAlchemyError as exc:
            if not is_outage(exc):
                raise
            self._next_state_try = time.monotonic() + 1.0
            return
        self._state_unwritten = False

    def _heartbeat_loop(self) -> None:
        """Until the loop has ended (not just been asked to stop: a task finishing in its grace period keeps
        its lease), renew the lease; once a stop is asked, show the worker as stopping (not ready)."""
        every = max(0.5, self.lease_seconds / 4)
        marked = False
        while not self._finished.wait(every):
            try:
                if self.stop_event.is_set() and not marked:
                    with self._state_lock:
                        self.health.call(lambda: self.store.workers.set_state(self.worker_id, "stopping",
                                                                              task_id=self.current_task))
                    marked = True
                self.health.call(lambda: self.store.workers.heartbeat(self.worker_id, self.current_task))
            except SQLAlchemyError as exc:
                if not is_outage(exc):  # an outage is logged once by self.health, not at every beat
                    log.exception("heartbeat failed")
