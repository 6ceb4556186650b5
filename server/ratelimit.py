"""Per-API-key request rate limit (PARTICALIZE_RATE_LIMIT_PER_MINUTE; 0: off), answered as Wiro's code 96.

A moving window (the `limits` library): a request is allowed when fewer than `per_minute` requests of the
same caller were allowed in the last 60 seconds, so there is no burst at window edges. The caller is the API
key; with no keys configured (loopback-only mode) it is the client address.

Where the counts live (PARTICALIZE_RATE_LIMIT_STORAGE): `memory://` (the default) is this API process's memory,
right for one machine; with N replicas behind a load balancer a key could then make N x the limit. A `redis://`
URL counts in one Redis that every replica shares (the library's own storage: one atomic script per request), so
the limit holds for the whole fleet. The task database is not used for this: it would add a write to every
request, Detail polls included, and a limited client could then still load the database.

A shared storage that does not answer fails open: the request is allowed uncounted (an unreachable limiter must
not take the API down), one log line when the outage starts and one when it ends, and the
particalize_rate_limit_* metrics say so. While it is down the storage is tried again every `retry_seconds`, not at
every request, so the outage adds no latency.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

from limits import RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.errors import QUEUE_FULL, ApiError
from server.rate_limit_storage import MEMORY, check_storage_url
from server.store.outage import describe

log = logging.getLogger("particalize.server")

RATE_LIMITED = QUEUE_FULL
"""Wiro's code for a full queue or a concurrency limit (96)."""
STORAGE_TIMEOUT_SECONDS = 0.5
"""Connect and read timeout of one call to a shared storage: an unreachable host costs a request at most this."""


class StorageHealth:
    """Whether the shared storage answers, logging only when that changes; while it is down, when to try it next."""

    def __init__(self, retry_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_seconds = retry_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.next_try = -math.inf
        self.outages = 0
        self.unchecked = 0
        """Requests let through uncounted because the storage did not answer."""

    @property
    def up(self) -> bool:
        return self.down_since is None

    def should_try(self) -> bool:
        """False while an outage is known and its next try is not due (the request is then let through)."""
        with self._lock:
            if self.down_since is None or self.clock() >= self.next_try:
                return True
            self.unchecked += 1
            return False

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.unchecked += 1
            self.next_try = self.clock() + self.retry_seconds
            if self.down_since is not None:
                return
            self.down_since = self.clock()
            self.outages += 1
        log.warning("the rate limit storage is unavailable (%s); requests are let through uncounted until it "
                    "answers (tried again every %.0fs)", describe(exc), self.retry_seconds)

    def succeeded(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            lasted, self.down_since = self.clock() - self.down_since, None
        log.warning("the rate limit storage answers again after %.1fs; rate limits are enforced", lasted)


class RateLimiter:
    """Allows `per_window` requests per caller in any `window_seconds`; refuses the rest with code 96."""

    def __init__(self, per_window: int, window_seconds: int = 60, *, storage_url: str = MEMORY,
                 key_prefix: str = "particalize", retry_seconds: float = 5.0) -> None:
        if per_window < 1 or window_seconds < 1:
            raise ValueError("a rate limit needs at least 1 request in a window of at least 1 second")
        self.per_window = per_window
        self.window_seconds = window_seconds
        self.shared = check_storage_url(storage_url) != MEMORY
        """The counts are in a storage other replicas share (a network call per request: not on the event loop)."""
        self._item = RateLimitItemPerSecond(per_window, window_seconds)
        storage: Storage = MemoryStorage() if not self.shared else storage_from_string(
            storage_url, key_prefix=key_prefix, wrap_exceptions=True,
            socket_timeout=STORAGE_TIMEOUT_SECONDS, socket_connect_timeout=STORAGE_TIMEOUT_SECONDS)
        self._limiter = MovingWindowRateLimiter(storage)
        self.health = StorageHealth(retry_seconds)
        # In memory, one hit and its window stats as one step: the storage's per-key locks are created lazily and
        # dropped by its expiry timer, so concurrent first hits of one key could otherwise both pass. A shared
        # storage is atomic itself (one script per hit); a lock there would only queue requests behind the network.
        self._lock = threading.Lock() if not self.shared else None

    @classmethod
    def per_minute(cls, requests: int, *, storage_url: str = MEMORY, key_prefix: str = "particalize",
                   ) -> RateLimiter | None:
        """The limiter allowing `requests` a minute; None when it is 0 (no limit)."""
        return cls(requests, storage_url=storage_url, key_prefix=key_prefix) if requests > 0 else None

    def check(self, caller: str, *, by_address: bool = False) -> None:
        """Count one request of `caller` (an API key, or a client address when `by_address`); raise
        ApiError code 96 saying the limit and when to retry when it is over the limit. A shared storage that does
        not answer lets the request through (see the module's docstring)."""
        reset_time = self._hit(caller)
        if reset_time is None:
            return
        wait = max(1, math.ceil(reset_time - time.time()))
        who = f"this client address ({caller})" if by_address else "this API key"
        window = "minute" if self.window_seconds == 60 else f"{self.window_seconds} seconds"
        raise ApiError(
            f"Rate limit exceeded: {who} may make {self.per_window} requests per {window} to this server; "
            f"retry in {wait} seconds.",
            code=RATE_LIMITED,
        )

    def _hit(self, caller: str) -> float | None:
        """None when the request is allowed (or let through uncounted); else when the caller's window frees a slot."""
        if self._lock is not None:
            with self._lock:
                if self._limiter.hit(self._item, caller):
                    return None
                return self._limiter.get_window_stats(self._item, caller).reset_time
        if not self.health.should_try():
            return None
        try:
            allowed = self._limiter.hit(self._item, caller)
            reset_time = None if allowed else self._limiter.get_window_stats(self._item, caller).reset_time
        except StorageError as exc:
            self.health.failed(exc.storage_error)
            return None
        self.health.succeeded()
        return reset_time


class RateLimitCollector(Collector):
    """/metrics: whether the limiter's storage answers, its outages and the requests let through uncounted."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def collect(self) -> Iterator[Metric]:
        health = self.limiter.health
        yield GaugeMetricFamily("particalize_rate_limit_storage_up", "1 when the rate limit storage answers (always "
                                "1 in memory), 0 during an outage (requests are then let through uncounted).",
                                value=1 if health.up else 0)
        yield CounterMetricFamily("particalize_rate_limit_storage_outages", "Outages of the rate limit storage seen "
                                  "by this process.", value=health.outages)
        yield CounterMetricFamily("particalize_rate_limit_unchecked", "Requests let through uncounted because the "
                                  "rate limit storage did not answer (fail open).", value=health.unchecked)
