"""Per-API-key request rate limit (PARTICALIZE_RATE_LIMIT_PER_MINUTE; 0: off), answered as Wiro's code 96.

A moving window (the `limits` library): a request is allowed when fewer than `per_minute` requests of the
same caller were allowed in the last 60 seconds, so there is no burst at window edges. The caller is the API
key; with no keys configured (loopback-only mode) it is the client address.

The counts live in this API process's memory: with N API replicas behind a load balancer a key may make up
to N x the limit (set the limit per replica accordingly). Chosen over counting in the task database because
that would add a write to every request, polls of Task/Detail included, and a limited client could then
still load the database; the replica's own memory is what the limit protects.
"""

from __future__ import annotations

import math
import threading
import time

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from server.errors import QUEUE_FULL, ApiError

RATE_LIMITED = QUEUE_FULL
"""Wiro's code for a full queue or a concurrency limit (96)."""


class RateLimiter:
    """Allows `per_window` requests per caller in any `window_seconds`; refuses the rest with code 96."""

    def __init__(self, per_window: int, window_seconds: int = 60) -> None:
        if per_window < 1 or window_seconds < 1:
            raise ValueError("a rate limit needs at least 1 request in a window of at least 1 second")
        self.per_window = per_window
        self.window_seconds = window_seconds
        self._item = RateLimitItemPerSecond(per_window, window_seconds)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        # One hit and its window stats as one step: the storage's per-key locks are created lazily and
        # dropped by its expiry timer, so concurrent first hits of one key could otherwise both pass.
        self._lock = threading.Lock()

    @classmethod
    def per_minute(cls, requests: int) -> RateLimiter | None:
        """The limiter allowing `requests` a minute; None when it is 0 (no limit)."""
        return cls(requests) if requests > 0 else None

    def check(self, caller: str, *, by_address: bool = False) -> None:
        """Count one request of `caller` (an API key, or a client address when `by_address`); raise
        ApiError code 96 saying the limit and when to retry when it is over the limit."""
        with self._lock:
            if self._limiter.hit(self._item, caller):
                return
            stats = self._limiter.get_window_stats(self._item, caller)
        wait = max(1, math.ceil(stats.reset_time - time.time()))
        who = f"this client address ({caller})" if by_address else "this API key"
        window = "minute" if self.window_seconds == 60 else f"{self.window_seconds} seconds"
        raise ApiError(
            f"Rate limit exceeded: {who} may make {self.per_window} requests per {window} to this server; "
            f"retry in {wait} seconds.",
            code=RATE_LIMITED,
        )
