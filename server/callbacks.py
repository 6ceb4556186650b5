"""callbackUrl delivery: when a task ends, POST its Task/Detail JSON to the URL the client gave.

Due callbacks are rows in the store (state `pending`, a next-attempt time), so they survive a restart and
any API process can send them (a claimed one is held so no other process sends it at the same time).
Each attempt runs on a small thread pool apart from the queue and the workers, is logged with its
outcome, and a failure is retried with exponential back-off up to the store's attempts. The same SSRF guard
as for input images applies.

The sender looks for due callbacks when it is told that a task may have ended (`CallbackDispatcher`), not every
0.2 s as it used to: an idle API process then costs the database one look every `SAFETY_SECONDS` instead of five a
second. On SQLite, where another process's worker tells no one, it also looks when SQLite's commit counter moved
(read every 0.2 s, no table read: server/store/commits.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from server.netguard import FetchError, UnsafeUrl, post_json
from server.store import Store
from server.store.commits import SqliteCommits
from server.store.models import TERMINAL, Task
from server.store.notify import EVENTS, Listener
from server.store.outage import StoreHealth, is_outage
from server.task_record import record_of

log = logging.getLogger("particalize.callbacks")


@dataclass(frozen=True)
class CallbackOptions:
    timeout_seconds: float = 10.0
    """Of one callback POST."""
    allow_private_urls: bool = False


SAFETY_SECONDS = 5.0
"""How often due callbacks are looked for without being woken: a retry another process scheduled, a callback held
by a process that died, a lost notification."""
POLL_SECONDS = 0.2
"""How often they are looked for while the database's notifications should come but do not (the listening
connection lost), the pace of the sender before it was woken; and how often SQLite's commit counter is read."""
BATCH_SECONDS = 0.2
"""Least time between two looks: the tasks ending meanwhile are served by one look."""


class CallbackDispatcher:
    """Sends due callbacks. It looks for them when woken (`wake`: a task ended in this process or in one of
    `serve`'s workers, or PostgreSQL announced a new status on `listener`), on SQLite when a commit was counted
    (`commits`), when a retry it scheduled is due, when a sending slot frees up, and every `safety_seconds` anyway;
    at most once per `batch_seconds`. A wake-up is only a reason to look: what is due is read from the store
    (claimed, held, recorded) as before, so a callback is still sent at least once whatever the wake-ups do."""

    def __init__(
        self,
        store: Store,
        render: Callable[[Task], dict[str, Any]],
        options: CallbackOptions,
        *,
        post: Callable[..., int] = post_json,
        listener: Listener | None = None,
        commits: SqliteCommits | None = None,
        safety_seconds: float = SAFETY_SECONDS,
        poll_seconds: float = POLL_SECONDS,
        batch_seconds: float = BATCH_SECONDS,
        max_in_flight: int = 8,
    ) -> None:
        self.store = store
        self.render = render
        self.options = options
        self.post = post
        self.listener = listener
        self.commits = commits
        """SQLite: a commit anywhere (a worker of another process ending a task) is a reason to look."""
        self.safety_seconds = safety_seconds
        self.poll_seconds = poll_seconds
        self.batch_seconds = batch_seconds
        self.max_in_flight = max_in_flight
        self.looks = 0
        """Looks for due callbacks so far (each one write transaction)."""
        self._slots = threading.Semaphore(max_in_flight)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._retries_lock = threading.Lock()
        self._retries: list[float] = []
        """When (time.monotonic) the retries this process scheduled are due."""
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="callback")
        self._thread = threading.Thread(target=self._loop, name="callbacks", daemon=True)
        self.health = StoreHealth(log, "callback sender")
        if listener is not None:
            listener.subscribe(EVENTS, self._notified)

    def start(self) -> CallbackDispatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.commits is not None:
            self.commits.close()

    def wake(self) -> None:
        """Look for due callbacks soon (a task may have ended). Any thread; never blocks."""
        self._wake.set()

    def task_changed(self, task_id: int, status: str) -> None:
        """A `TaskLifecycle.changed` listener: a task that ended may have a callback due."""
        if status in TERMINAL:
            self._wake.set()

    def _notified(self, payload: str | None) -> None:
        """A task has a new status (which one the notification does not say), or notifications may have been
        missed (None): either way, look."""
        self._wake.set()

    def _loop(self) -> None:
        hold = self.options.timeout_seconds * 2 + 5
        while not self._stop.is_set():
            self._wake.clear()  # a wake-up from here on is news for the next look
            if self.commits is not None:
                self.commits.changed()  # and a commit from here on (the look's own: one more look at most)
            self._look(hold)
            last = time.monotonic()
            self._wait_for_news(last)
            wait = last + self.batch_seconds - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)

    def _wait_for_news(self, since: float) -> None:
        """Until woken, a commit counted on SQLite, or the time `_wait_seconds` gives runs out."""
        deadline = since + self._wait_seconds(since)
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.commits is None:
                self._wake.wait(left)
                return
            if self._wake.wait(min(left, self.poll_seconds)) or self.commits.changed():
                return

    def _wait_seconds(self, now: float) -> float:
        """Until the next look without a wake-up: the safety look, sooner while notifications should come but do
        not, or the earliest retry this process scheduled."""
        wait = self.safety_seconds
        if self.listener is not None and not self.listener.listening:
            wait = self.poll_seconds
        with self._retries_lock:
            self._retries = [at for at in self._retries if at > now]
            if self._retries:
                wait = min(wait, min(self._retries) - now)
        return max(0.0, wait)

    def _look(self, hold: float) -> None:
        free = 0
        while self._slots.acquire(blocking=False):
            free += 1
        try:
            due = self.health.call(partial(self.store.callbacks.claim_due, limit=free, hold_seconds=hold)) \
                if free else []
            self.looks += 1 if free else 0
        except SQLAlchemyError as exc:
            if not is_outage(exc):  # an outage is logged once when it starts and once when it ends
                log.exception("could not read due callbacks")
            due = []
            self._retry_in(1.0)  # the store is back soon or not: look again in a second either way
        for _ in range(free - len(due)):
            self._slots.release()
        for task_id in due:
            self._pool.submit(self._deliver_and_release, task_id)

    def _retry_in(self, seconds: float) -> None:
        with self._retries_lock:
            self._retries.append(time.monotonic() + max(0.0, seconds))

    def _deliver_and_release(self, task_id: int) -> None:
        try:
            self.deliver(task_id)
        except Exception:
            log.exception("callback for task %s failed unexpectedly", task_id, extra={"task_id": task_id})
        finally:
            self._slots.release()
            self._wake.set()  # a slot is free: callbacks that found none may be waiting; and a retry to schedule

    def deliver(self, task_id: int) -> bool:
        """One attempt: POST, log, record the outcome. True if the receiver answered 2xx."""
        task = self.store.reads.get(task_id)
        url = "" if task is None else record_of(task).callback_url
        if task is None or not url:
            return False
        try:
            status = self.post(
                url, self.render(task), timeout=self.options.timeout_seconds,
                allow_private=self.options.allow_private_urls,
            )
            delivered = 200 <= status < 300
            outcome = f"HTTP {status}"
        except (FetchError, UnsafeUrl) as exc:
            delivered, outcome = False, str(exc)
        state, attempts, next_at = self.store.callbacks.record(task_id, delivered)
        if next_at is not None:
            self._retry_in(next_at - self.store.clock())
        if delivered:
            log.info("callback task %s attempt %d to %s: delivered (%s)", task_id, attempts, url,
                     outcome, extra={"task_id": task_id})
        elif state == "failed":
            log.warning("callback task %s attempt %d to %s: %s; giving up after %d attempts", task_id, attempts,
                        url, outcome, attempts, extra={"task_id": task_id})
        else:
            log.warning("callback task %s attempt %d to %s: %s; retrying at %.0f", task_id, attempts,
                        url, outcome, next_at or 0, extra={"task_id": task_id})
        return delivered
