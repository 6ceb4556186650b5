"""How a worker learns that a task was queued or killed: woken, or by looking.

- `Polling` (a worker on SQLite that no `serve` started): it looks every `poll_seconds` (0.05 s) for a queued task
  and reads its running task's kill flag every 0.1 s, as before wake-ups.
- `Notified` wake-ups, from PostgreSQL's NOTIFY (`postgres_wakeup`, server/store/notify.py), or from the `serve`
  process that started the worker on SQLite (`PipeWakeup`: serve writes a line to each worker's pipe when a Run
  queues a task or a Kill cancels one). An idle worker then claims at once when woken and otherwise looks only
  every `safety_seconds` (covering a lost wake-up); a running task's kill flag is read at once when woken for it,
  else every `safety_seconds`. While the wake-ups are down (the listening connection lost, the pipe closed) the
  worker goes back to polling at the fast rates.

A wake-up is only a reason to look: the claim and the kill flag are read from the store as before, so nothing that
was at-least-once or forward-only depends on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from server.processes.wake_pipes import WAKE_FD_ENV
from server.store.db import Database
from server.store.notify import CANCEL, QUEUE, Listener

log = logging.getLogger("particalize.worker")

KILL_POLL_SECONDS = 0.1
"""Without wake-ups: how often a running task's kill flag is read (as before wake-ups)."""
STOP_CHECK_SECONDS = 0.25
"""An idle worker waiting for a wake-up still notices its stop request this often."""


class Wakeup:
    """Polling: no wake-ups (the base the others extend)."""

    def __init__(self, poll_seconds: float) -> None:
        self.poll_seconds = poll_seconds

    @property
    def live(self) -> bool:
        """Wake-ups arrive now (so the worker may look less often)."""
        return False

    def idle_seconds(self) -> float:
        """How long an idle worker waits before it looks for a task itself."""
        return self.poll_seconds

    def kill_read_seconds(self) -> float:
        """How often a running task's kill flag is read without a wake-up."""
        return KILL_POLL_SECONDS

    def clear(self) -> None:
        """Before looking for a task: a wake-up from now on is news."""

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        """Until a task may have been queued, `stop` is set, or `seconds` have passed; True unless the time ran out
        (polling: never woken, it just looks at its pace)."""
        return stop.wait(seconds)

    @contextlib.contextmanager
    def watching(self, task_id: int, on_cancel: Callable[[], None]) -> Iterator[None]:
        """While the worker runs `task_id`: `on_cancel()` when it may have been cancelled or killed."""
        yield

    def close(self) -> None:
        pass


class Polling(Wakeup):
    pass


class Notified(Wakeup):
    """Wake-ups pushed by a source (a subclass feeds `queued`, `cancelled` and `missed`)."""

    def __init__(self, poll_seconds: float, safety_seconds: float) -> None:
        super().__init__(poll_seconds)
        self.safety_seconds = safety_seconds
        self._queued = threading.Event()
        self._lock = threading.Lock()
        self._watched: dict[int, Callable[[], None]] = {}

    def idle_seconds(self) -> float:
        return self.safety_seconds if self.live else self.poll_seconds

    def kill_read_seconds(self) -> float:
        return self.safety_seconds if self.live else KILL_POLL_SECONDS

    def clear(self) -> None:
        self._queued.clear()

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._queued.wait(min(left, STOP_CHECK_SECONDS)):
                return True
        return True

    @contextlib.contextmanager
    def watching(self, task_id: int, on_cancel: Callable[[], None]) -> Iterator[None]:
        with self._lock:
            self._watched[task_id] = on_cancel
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(task_id, None)

    # --- fed by the source -----------------------------------------------------------------------

    def queued(self) -> None:
        self._queued.set()

    def cancelled(self, task_id: int) -> None:
        with self._lock:
            callback = self._watched.get(task_id)
        if callback is not None:
            callback()

    def missed(self) -> None:
        """Wake-ups may have been lost: look for a task, and read the kill flag, now."""
        self._queued.set()
        with self._lock:
            callbacks = list(self._watched.values())
        for callback in callbacks:
            callback()


def _task_id(payload: str | None) -> int | None:
    return int(payload) if payload is not None and payload.isdigit() else None


class PostgresWakeup(Notified):
    """Wake-ups from PostgreSQL's NOTIFY on the queue and cancel channels, on a listening connection of its own."""

    def __init__(self, db: Database, poll_seconds: float, safety_seconds: float, name: str = "worker") -> None:
        super().__init__(poll_seconds, safety_seconds)
        self.listener = Listener(db, (QUEUE, CANCEL), name=f"{name} listener")
        self.listener.subscribe(QUEUE, self._on_queue)
        self.listener.subscribe(CANCEL, self._on_cancel)
        self.listener.start()

    @property
    def live(self) -> bool:
        return self.listener.listening

    def _on_queue(self, payload: str | None) -> None:
        if payload is None:
            self.missed()
        else:
            self.queued()

    def _on_cancel(self, payload: str | None) -> None:
        task_id = _task_id(payload)
        if task_id is None:
            self.missed()
        else:
            self.cancelled(task_id)

    def close(self) -> None:
        self.listener.close()


class PipeWakeup(Notified):
    """Wake-ups from the `serve` process that started this worker (SQLite): lines `task_queue <id>` and
    `task_cancel <id>` on a pipe. The pipe closing (serve gone) ends the wake-ups: the worker polls."""

    def __init__(self, fd: int, poll_seconds: float, safety_seconds: float) -> None:
        super().__init__(poll_seconds, safety_seconds)
        self._open = threading.Event()
        self._open.set()
        self._thread = threading.Thread(target=self._read, args=(fd,), name="wake-pipe", daemon=True)
        self._thread.start()

    @property
    def live(self) -> bool:
        return self._open.is_set()

    def _read(self, fd: int) -> None:
        try:
            with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as pipe:
                for line in pipe:
                    status, _, payload = line.strip().partition(" ")
                    task_id = _task_id(payload)
                    if status == "task_queue":
                        self.queued()
                    elif status == "task_cancel" and task_id is not None:
                        self.cancelled(task_id)
        except OSError as exc:
            log.warning("the wake-up pipe from serve failed (%s); polling instead", exc)
        finally:
            self._open.clear()
            self.missed()


def pipe_wakeup_from_env(poll_seconds: float, safety_seconds: float) -> PipeWakeup | None:
    """The wake-up pipe `serve` gave this worker process (taken out of the environment), or None."""
    fd = os.environ.pop(WAKE_FD_ENV, None)
    if not fd or not fd.isdigit():
        return None
    try:
        os.fstat(int(fd))
    except OSError:
        return None
    return PipeWakeup(int(fd), poll_seconds, safety_seconds)


def wakeup_for(db: Database, poll_seconds: float, safety_seconds: float) -> Wakeup:
    """A worker's wake-ups when nothing else gives it any: PostgreSQL's notifications, else polling (SQLite)."""
    if db.is_postgres:
        return PostgresWakeup(db, poll_seconds, safety_seconds)
    return Polling(poll_seconds)
