"""callbackUrl delivery: when a task ends, POST its Task/Detail JSON to the URL the client gave.

Due callbacks are rows in the store (state `pending`, a next-attempt time), so they survive a restart and
any API process can send them (a claimed one is held so no other process sends it at the same time).
Each attempt runs on a small thread pool apart from the queue and the workers, is logged with its
outcome, and a failure is retried with exponential back-off up to the store's attempts. The same SSRF guard
as for input images applies.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from server.netguard import FetchError, UnsafeUrl, post_json
from server.store import Store
from server.store.models import Task
from server.store.outage import StoreHealth, is_outage
from server.task_record import record_of

log = logging.getLogger("particalize.callbacks")


@dataclass(frozen=True)
class CallbackOptions:
    timeout_seconds: float = 10.0
    """Of one callback POST."""
    allow_private_urls: bool = False


class CallbackDispatcher:
    def __init__(
        self,
        store: Store,
        render: Callable[[Task], dict[str, Any]],
        options: CallbackOptions,
        *,
        post: Callable[..., int] = post_json,
        poll_seconds: float = 0.2,
        max_in_flight: int = 8,
    ) -> None:
        self.store = store
        self.render = render
        self.options = options
        self.post = post
        self.poll_seconds = poll_seconds
        self.max_in_flight = max_in_flight
        self._slots = threading.Semaphore(max_in_flight)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="callback")
        self._thread = threading.Thread(target=self._loop, name="callbacks", daemon=True)
        self.health = StoreHealth(log, "callback sender")

    def start(self) -> CallbackDispatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        hold = self.options.timeout_seconds * 2 + 5
        while not self._stop.is_set():
            free = 0
            while self._slots.acquire(blocking=False):
                free += 1
            try:
                due = self.health.call(partial(self.store.callbacks.claim_due, limit=free, hold_seconds=hold)) \
                    if free else []
            except SQLAlchemyError as exc:
                if not is_outage(exc):  # an outage is logged once when it starts and once when it ends
                    log.exception("could not read due callbacks")
                due = []
            for _ in range(free - len(due)):
                self._slots.release()
            for task_id in due:
                self._pool.submit(self._deliver_and_release, task_id)
            self._stop.wait(self.poll_seconds)

    def _deliver_and_release(self, task_id: int) -> None:
        try:
            self.deliver(task_id)
        except Exception:
            log.exception("callback for task %s failed unexpectedly", task_id, extra={"task_id": task_id})
        finally:
            self._slots.release()

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
