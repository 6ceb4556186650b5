"""Rate limits shared by API replicas through Redis (PARTICALIZE_RATE_LIMIT_STORAGE=redis://...), against a real
Redis: N replicas give a key its limit once, not N times; Redis going away lets requests through uncounted (never a
500), logged once per outage and shown in /metrics; once it is back the limit holds again.

Every test counts under a key prefix of its own, so tests running in parallel (pytest-xdist) never share counts.
The outage tests start a Redis of their own on a free port (never the shared one on 6379)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from benchmarks.harness import free_port
from particalize.compose_server import build_app
from particalize.settings import Settings
from server.errors import ApiError
from server.ratelimit import RateLimiter
from tests.conftest import make_settings
from tests.test_api import KEY, SECRET, Api, assert_error

REDIS_URL = os.environ.get("PARTICALIZE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_DISABLED = os.environ.get("PARTICALIZE_TEST_REDIS", "1") == "0"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    if REDIS_DISABLED:
        pytest.skip("Redis tests disabled (PARTICALIZE_TEST_REDIS=0)")
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}). Start it (scripts/ensure-redis.sh), point "
                    "PARTICALIZE_TEST_REDIS_URL at one, or set PARTICALIZE_TEST_REDIS=0 to skip its tests.")
    prefix = f"particalize-test-{secrets.token_hex(6)}"
    try:
        yield prefix
    finally:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port, that the test may stop and start again."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("no redis-server binary to start a private Redis")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="particalize-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if REDIS_DISABLED:
        pytest.skip("Redis tests disabled (PARTICALIZE_TEST_REDIS=0)")
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.remove()


def allowed(limiter: RateLimiter, caller: str) -> bool:
    try:
        limiter.check(caller)
    except ApiError as exc:
        assert exc.code == 96
        return False
    return True


def test_two_replicas_sharing_redis_give_a_key_its_limit_once(redis_prefix: str):
    replicas = [RateLimiter(5, storage_url=REDIS_URL, key_prefix=redis_prefix) for _ in range(2)]
    assert all(r.shared for r in replicas)
    answers = [allowed(replicas[i % 2], "key-a") for i in range(8)]
    assert answers == [True] * 5 + [False] * 3, answers
    assert allowed(replicas[0], "key-b"), "each key has its own count"
    memory = [RateLimiter(5) for _ in range(2)]
    assert sum(allowed(memory[i % 2], "key-a") for i in range(8)) == 8, "in memory each replica counts alone"


def test_concurrent_requests_across_replicas_never_exceed_the_limit(redis_prefix: str):
    replicas = [RateLimiter(5, storage_url=REDIS_URL, key_prefix=redis_prefix) for _ in range(2)]
    results: list[bool] = []
    start = threading.Barrier(20)

    def hit(index: int) -> None:
        start.wait()
        results.append(allowed(replicas[index % 2], "k"))

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 20 and results.count(True) == 5


def shared_settings(tmp_path: Path, storage: str, prefix: str, **overrides) -> Settings:
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", api_keys=f"{KEY}:{SECRET}",
                         rate_limit_per_minute=3, rate_limit_storage=storage, rate_limit_key_prefix=prefix,
                         **overrides)


def test_two_api_apps_on_one_redis_share_a_keys_limit(redis_prefix: str, tmp_path: Path):
    settings = shared_settings(tmp_path, REDIS_URL, redis_prefix)
    with TestClient(build_app(settings)) as first, TestClient(build_app(settings)) as second:
        a, b = Api(first), Api(second)
        assert a.json("/v1/Task/List", {}).json()["result"] is True
        assert b.json("/v1/Task/List", {}).json()["result"] is True
        assert a.json("/v1/Task/List", {}).json()["result"] is True
        assert_error(b.json("/v1/Task/List", {}), 96, contains="this API key may make 3 requests per minute")
        assert_error(a.json("/v1/Task/List", {}), 96, contains="Rate limit exceeded")


def test_redis_unreachable_lets_requests_through_logged_once_and_shown_in_metrics(
        redis_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there: connection refused
    settings = shared_settings(tmp_path, nowhere, redis_prefix)
    with caplog.at_level(logging.WARNING, logger="particalize.server"), TestClient(build_app(settings)) as client:
        api = Api(client)
        answers = [api.json("/v1/Task/List", {}) for _ in range(6)]
        assert [(r.status_code, r.json()["result"]) for r in answers] == [(200, True)] * 6, "fail open, never a 500"
        metrics = client.get("/metrics").text
    lines = [r.getMessage() for r in caplog.records if "rate limit storage is unavailable" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "particalize_rate_limit_storage_up 0.0" in metrics
    assert "particalize_rate_limit_storage_outages_total 1.0" in metrics
    assert "particalize_rate_limit_unchecked_total 6.0" in metrics


def test_redis_restarted_fails_open_meanwhile_then_the_limit_holds_again(
        private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture):
    limiter = RateLimiter(3, storage_url=private_redis.url, key_prefix="t", retry_seconds=0.2)
    assert [allowed(limiter, "k") for _ in range(4)] == [True, True, True, False]
    private_redis.stop()
    with caplog.at_level(logging.WARNING, logger="particalize.server"):
        assert all(allowed(limiter, "k") for _ in range(10)), "Redis down: let through, not refused, not raised"
        assert not limiter.health.up and limiter.health.outages == 1
        private_redis.start()  # an empty Redis: the counts start again
        time.sleep(0.3)  # past retry_seconds: the next request tries Redis again
        assert [allowed(limiter, "k") for _ in range(4)] == [True, True, True, False]
    assert limiter.health.up and limiter.health.unchecked == 10
    messages = [r.getMessage() for r in caplog.records]
    assert sum("rate limit storage is unavailable" in m for m in messages) == 1, messages
    assert sum("rate limit storage answers again" in m for m in messages) == 1, messages


def test_the_storage_setting_takes_memory_or_redis_urls_only(tmp_path: Path):
    assert make_settings(tmp_path).rate_limit_storage == "memory://"
    assert make_settings(tmp_path, rate_limit_storage="rediss://r.internal:6380/1").rate_limit_storage \
        == "rediss://r.internal:6380/1"
    with pytest.raises(ValueError, match="PARTICALIZE_RATE_LIMIT_STORAGE"):
        make_settings(tmp_path, rate_limit_storage="memcached://localhost:11211")
