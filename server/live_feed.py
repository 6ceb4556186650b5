"""One reader of task events for every live follower (WebSocket, SSE) of an API process.

A follower used to ask the store for its task's new events every 0.25 s: 1,000 followers were 4,000 queries a
second. Here the followers of a process subscribe to one `EventFeed`, which reads the new events of every task that
may have some in one query (each task from the last event its slowest follower has) and hands each follower its own.
It reads when PostgreSQL says a task has a new status (server/store/notify.py), every `poll_seconds` for the
followed tasks that are generating (their progress is not announced: see migration 0006), and every
`safety_seconds` for all followed tasks (a lost notification); at most one read per `batch_seconds`, so however many
tasks and followers there are, following costs at most 4 reads a second, and 0.2 while nothing followed generates.
Without notifications (SQLite, or the listening connection down) it reads every `poll_seconds` for all followed
tasks: one query where there was one per follower.

The events are read from the store, in id order per task (one writer at a time per task, under the task's row
lock), and each follower is given only those after the last it got: a follower misses nothing and gets nothing
twice, whatever the notifications do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterable

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from server.store import Store
from server.store.models import OUTPUT, START, TaskEvent
from server.store.notify import EVENTS, Listener
from server.store.outage import is_outage

log = logging.getLogger("particalize.server")

POLL_SECONDS = 0.25
"""Without notifications: how often the followed tasks are read (the old per-follower pace)."""
SAFETY_SECONDS = 5.0
"""With notifications: how often every followed task is read anyway."""
BATCH_SECONDS = 0.25
"""Least time between two reads: notifications arriving meanwhile are served by one read."""
TASKS_PER_QUERY = 1000
MAX_ROWS = 10_000
OUTAGE_RETRY_SECONDS = 1.0
GENERATING = (START, OUTPUT)
"""The statuses a task writes its progress in (not announced: read at the polling pace)."""


class Subscription:
    """One follower's share: the events after `seen` that the feed has read for its task, and a wake-up."""

    def __init__(self, task_id: int, seen: int) -> None:
        self.task_id = task_id
        self.seen = seen
        self.pending: list[TaskEvent] = []
        self.wake = asyncio.Event()

    def take(self) -> list[TaskEvent]:
        self.wake.clear()
        taken, self.pending = self.pending, []
        return taken

    def put_back(self, events: list[TaskEvent]) -> None:
        """Events taken but not sent (the store could not render them now): first in line again."""
        self.pending[:0] = events


class EventFeed:
    def __init__(self, store: Store, listener: Listener | None = None, *, poll_seconds: float = POLL_SECONDS,
                 safety_seconds: float = SAFETY_SECONDS, batch_seconds: float = BATCH_SECONDS) -> None:
        self.store = store
        self.listener = listener
        self.poll_seconds, self.safety_seconds, self.batch_seconds = poll_seconds, safety_seconds, batch_seconds
        self._subs: dict[int, set[Subscription]] = {}
        self._status: dict[int, str] = {}
        """Each followed task's latest status read: those generating are read at the polling pace."""
        self._dirty: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._reader: asyncio.Task | None = None
        self.reads = 0
        """Reads of the store so far (each one query per TASKS_PER_QUERY tasks)."""
        if listener is not None:
            listener.subscribe(EVENTS, self._notified)

    @classmethod
    def open(cls, store: Store) -> EventFeed:
        """The feed of `store`: on PostgreSQL woken by its notifications (a listening connection of its own)."""
        listener = Listener(store.db, (EVENTS,), name="live listener").start() if store.db.is_postgres else None
        return cls(store, listener)

    @property
    def notified(self) -> bool:
        return self.listener is not None and self.listener.listening

    def subscribe(self, task_id: int, seen: int = 0) -> Subscription:
        """A follower of `task_id` that has the events up to `seen` (0: none): the next read brings the rest.
        Call on the event loop."""
        self._start()
        sub = Subscription(task_id, seen)
        self._subs.setdefault(task_id, set()).add(sub)
        self._mark(task_id)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.task_id]
                self._status.pop(sub.task_id, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self.listener is not None:
            await run_in_threadpool(self.listener.close)

    # --- reading ---------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._reader is None:
            self._loop = asyncio.get_running_loop()
            self._changed = asyncio.Event()
            self._reader = self._loop.create_task(self._run(), name="live-feed")

    def _notified(self, payload: str | None) -> None:
        """From the listener's thread: a task has a new event (None: events may have been missed)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        task_id = int(payload) if payload is not None and payload.isdigit() else None
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._mark, task_id)

    def _mark(self, task_id: int | None) -> None:
        """`task_id` may have new events (None: every followed task may)."""
        if task_id is None:
            self._dirty.update(self._subs)
        elif task_id in self._subs:
            self._dirty.add(task_id)
        else:
            return
        assert self._changed is not None
        self._changed.set()

    async def _run(self) -> None:
        assert self._changed is not None and self._loop is not None
        last = -math.inf
        read_all_at = self._loop.time() + self.safety_seconds
        while True:
            generating = [t for t in self._subs if self._status.get(t) in GENERATING]
            if not self.notified or generating:
                timeout = self.poll_seconds
            else:
                timeout = max(0.0, read_all_at - self._loop.time())
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                if not self.notified or self._loop.time() >= read_all_at:
                    self._dirty.update(self._subs)
                    read_all_at = self._loop.time() + self.safety_seconds
                else:
                    self._dirty.update(generating)
            self._changed.clear()
            wait = last + self.batch_seconds - self._loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            cursors = {t: min(s.seen for s in self._subs[t]) for t in self._dirty if self._subs.get(t)}
            self._dirty.clear()
            if not cursors:
                continue
            last = self._loop.time()
            try:
                events = await run_in_threadpool(self._read, cursors)
            except SQLAlchemyError as exc:
                if not is_outage(exc):  # a bug: said once here, the followers keep their keep-alives
                    log.exception("could not read the followed tasks' events")
                self._dirty.update(cursors)
                await asyncio.sleep(OUTAGE_RETRY_SECONDS)
                self._changed.set()
                continue
            self._deliver(events)

    def _read(self, cursors: dict[int, int]) -> list[TaskEvent]:
        """The events of each task in `cursors` after its id there, in id order."""
        found: list[TaskEvent] = []
        items = list(cursors.items())
        for start in range(0, len(items), TASKS_PER_QUERY):
            chunk = dict(items[start:start + TASKS_PER_QUERY])
            rows = self.store.reads.events_since(chunk, MAX_ROWS)
            self.reads += 1
            found.extend(rows)
            if len(rows) >= MAX_ROWS:  # the rest next time (what was read is a prefix of each task's events)
                self._loop_mark(chunk)
        return found

    def _loop_mark(self, task_ids: Iterable[int]) -> None:
        assert self._loop is not None
        for task_id in task_ids:
            self._loop.call_soon_threadsafe(self._mark, task_id)

    def _deliver(self, events: list[TaskEvent]) -> None:
        by_task: dict[int, list[TaskEvent]] = {}
        for event in events:
            by_task.setdefault(event.task_id, []).append(event)
        for task_id, found in by_task.items():
            if task_id in self._subs:
                self._status[task_id] = found[-1].status
            for sub in self._subs.get(task_id, ()):
                new = [e for e in found if e.id > sub.seen]
                if new:
                    sub.pending.extend(new)
                    sub.seen = new[-1].id
                    sub.wake.set()
