"""Which rate-limit storages the server knows, checked without importing the limiter (a GPU-only `generate` or
worker validates its settings without the API's dependencies)."""

from __future__ import annotations

MEMORY = "memory://"
SHARED_SCHEMES = ("redis://", "rediss://", "redis+unix://")
"""The storages a fleet of replicas can share (limits' Redis storage)."""


def check_storage_url(url: str) -> str:
    """`url` if it names a storage the limiter supports (memory://, redis://, rediss://, redis+unix://); ValueError
    saying which otherwise."""
    if url == MEMORY or url.startswith(SHARED_SCHEMES):
        return url
    raise ValueError(f"the rate limit storage must be {MEMORY} or a Redis URL ({', '.join(SHARED_SCHEMES)}...), "
                     f"got {url.split('://', 1)[0]!r}")
