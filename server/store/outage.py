"""Telling a store outage (the database is down, unreachable, locked or out of space) from a bug, and riding it out.

An outage is something that passes by itself: the API answers it with 503 and Retry-After, a worker waits for the
store to come back and then records what it did meanwhile. Anything else (a constraint violated, bad SQL) is a bug
and stays a 500 / a failed task.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import exc as sa_exc

T = TypeVar("T")

RETRY_AFTER_SECONDS = 5
"""What a 503 tells a client to wait: about how long a PostgreSQL restart or a failover takes."""
RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_SECONDS)}
"""The headers of every 503 (store outage, failed probe)."""

OUTAGE_MESSAGE = (
    "The task store is unavailable for the moment (the database does not answer or cannot be written); "
    f"nothing was changed by this request. Try again in {RETRY_AFTER_SECONDS} seconds."
)


def is_outage(exc: BaseException) -> bool:
    """A database failure that passes by itself: connection refused or dropped, server shutting down, pool
    exhausted, SQLite's file locked or its disk full (all OperationalError / InterfaceError in SQLAlchemy)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError
                      | sa_exc.DisconnectionError)


def describe(exc: BaseException) -> str:
    """One short line for the log (the driver's first line, no SQL, no parameters)."""
    inner = getattr(exc, "orig", None) or exc
    text = (str(inner).strip().splitlines() or [""])[0][:200]
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


class ThrottledLog:
    """For a process that cannot tell when an outage ends (the API sees only failed requests): at most one line
    every `every` seconds, saying how many more failed meanwhile, instead of one line per request."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.log, self.every = logger, every
        self._lock = threading.Lock()
        self._last, self._quiet = -math.inf, 0

    def warning(self, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.every:
                self._quiet += 1
                return
            quiet, self._last, self._quiet = self._quiet, now, 0
        self.log.warning(message + (f" ({quiet} more since the last such line)" if quiet else ""), *args)


class StoreHealth:
    """Whether this process can reach its store, shared by its threads, logging only when that changes:
    one line when an outage starts, one when it ends (not one per failed call)."""

    def __init__(self, logger: logging.Logger, what: str = "worker") -> None:
        self.log = logger
        self.what = what
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.back_at = -math.inf
        """When (time.monotonic) the last outage ended."""
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
            self.outages += 1
        self.log.warning("the task store is unavailable (%s); the %s waits for it and retries quietly",
                         describe(exc), self.what)

    def succeeded(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            self.back_at = time.monotonic()
            lasted, self.down_since = self.back_at - self.down_since, None
        self.log.warning("the task store answers again after %.1fs", lasted)

    def call(self, action: Callable[[], T]) -> T:
        """`action()`, noting the store's state; an outage is noted and raised again."""
        try:
            result = action()
        except Exception as exc:
            if is_outage(exc):
                self.failed(exc)
            raise
        self.succeeded()
        return result

    def retry(self, action: Callable[[], T], *, give_up: Callable[[], bool], first_wait: float = 0.25,
              max_wait: float = 5.0, sleep: Callable[[float], object] = time.sleep) -> T:
        """`action()` until it gets past an outage, waiting longer between tries (up to `max_wait`); an outage
        still there when `give_up()` says so is raised. Errors that are not outages are raised at once."""
        wait = first_wait
        while True:
            try:
                return self.call(action)
            except Exception as exc:
                if not is_outage(exc) or give_up():
                    raise
            sleep(wait)
            wait = min(max_wait, wait * 2)
