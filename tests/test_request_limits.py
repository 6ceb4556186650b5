"""Request limits through the API: the per-key rate limit (code 96), a full queue (code 96), the body size
cap, and the work cap (numFrames x width x height x steps) at Run and, for a size taken from the image, in
the worker. A refused request creates no task."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.errors import ApiError
from server.ratelimit import RateLimiter
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.test_api import (
    IMAGE_URL,
    KEY,
    OTHER_KEY,
    OTHER_SECRET,
    RUN,
    SECRET,
    SMALL,
    Api,
    assert_error,
    run_worker_once,
    signed,
)

ROUTES = ["/v1/Task/Detail", "/v1/Task/Kill", "/v1/Task/Cancel", "/v1/Task/List", "/v1/Tool/Detail",
          "/v1/File/Upload", "/v1/Task/InputOutputDelete", "/v1/Tool/List", "/v1/Tool/Explore", RUN]


def limited_client(tmp_path: Path, **overrides) -> Iterator[TestClient]:
    keys = f"{KEY}:{SECRET},{OTHER_KEY}:{OTHER_SECRET}"
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", api_keys=keys, allow_private_urls=True,
                             **overrides)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def client(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    yield from limited_client(tmp_path, **getattr(request, "param", {}))


def task_count(client: TestClient) -> int:
    return client.app.state.services.store.reads.count()


def retry_seconds(message: str) -> int:
    return int(message.split("retry in ", 1)[1].split(" ", 1)[0])


# --- rate limit ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", [{"rate_limit_per_minute": 3}], indirect=True)
def test_over_the_rate_limit_a_key_gets_code_96_saying_the_limit_and_when_to_retry(client: TestClient):
    api = Api(client)
    for _ in range(3):
        assert api.json("/v1/Task/List", {}).json()["result"] is True
    message = assert_error(api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}), 96,
                           contains="this API key may make 3 requests per minute")
    assert 1 <= retry_seconds(message) <= 60
    assert task_count(client) == 0, "a limited Run creates nothing"
    other = api.json("/v1/Task/List", {}, headers=signed(OTHER_KEY, OTHER_SECRET))
    assert other.json()["result"] is True, "each key has its own limit"


@pytest.mark.parametrize("client", [{"rate_limit_per_minute": 1}], indirect=True)
def test_the_rate_limit_covers_every_api_route_and_comes_after_authentication(client: TestClient):
    api = Api(client)
    assert api.json("/v1/Task/List", {}).json()["result"] is True
    for route in ROUTES:
        if route == "/v1/File/Upload":
            answer = api.multipart(route, {}, {"file": ("a.png", png_bytes(), "image/png")})
        else:
            answer = api.json(route, {"taskid": "1", "inputImageUrl": IMAGE_URL, **SMALL})
        assert_error(answer, 96, contains="Rate limit exceeded")
    assert_error(api.json("/v1/Task/List", {}, headers=signed(secret="wrong")), 0, status=401)
    assert_error(api.json("/v1/Task/List", {}, headers={}), 0, status=401)
    assert client.get("/healthz").status_code == 200, "non-API routes are not limited"


def test_without_keys_the_limit_is_per_client_address(tmp_path: Path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", rate_limit_per_minute=2)
    with TestClient(create_app(settings)) as client:
        for _ in range(2):
            assert client.post("/v1/Task/List", json={}).json()["result"] is True
        assert_error(client.post("/v1/Task/List", json={}), 96, contains="this client address (testclient)")
        neighbour = TestClient(client.app, client=("192.0.2.7", 5000))  # same app, already started
        assert neighbour.post("/v1/Task/List", json={}).json()["result"] is True


def test_no_rate_limit_by_default(client: TestClient):
    assert client.app.state.rate_limiter is None
    api = Api(client)
    assert all(api.json("/v1/Task/List", {}).json()["result"] for _ in range(25))


def test_the_window_moves_a_refused_caller_may_retry_when_its_oldest_request_leaves_it():
    limiter = RateLimiter(2, window_seconds=1)
    limiter.check("k")
    time.sleep(0.5)
    limiter.check("k")
    with pytest.raises(ApiError) as refused:
        limiter.check("k")
    assert refused.value.code == 96 and "2 requests per 1 seconds" in refused.value.message
    time.sleep(0.6)  # the first request has left the window, the second has not
    limiter.check("k")
    with pytest.raises(ApiError):
        limiter.check("k")


def test_concurrent_requests_of_one_key_never_exceed_the_limit():
    limiter = RateLimiter(5)
    allowed: list[bool] = []
    start = threading.Barrier(20)

    def hit() -> None:
        start.wait()
        try:
            limiter.check("k")
            allowed.append(True)
        except ApiError:
            allowed.append(False)

    threads = [threading.Thread(target=hit) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert allowed.count(True) == 5 and len(allowed) == 20


def test_rate_limiter_from_settings_is_off_at_zero():
    assert RateLimiter.from_settings(make_settings(Path("/nonexistent"), rate_limit_per_minute=0)) is None
    assert RateLimiter.from_settings(make_settings(Path("/nonexistent"), rate_limit_per_minute=7)).per_window == 7


# --- queue and body size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", [{"max_queue_length": 1}], indirect=True)
def test_a_full_queue_answers_code_96_and_creates_nothing(client: TestClient):
    api = Api(client)
    first = api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}).json()
    assert first["result"] is True
    assert_error(api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}), 96, contains="queue is full")
    assert task_count(client) == 1
    assert api.json("/v1/Task/Cancel", {"taskid": first["taskid"]}).json()["result"] is True
    assert api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}).json()["result"] is True, "room again"


@pytest.mark.parametrize("client", [{"max_body_bytes": 1024}], indirect=True)
def test_an_oversized_body_is_refused_with_or_without_content_length(client: TestClient):
    api = Api(client)
    big = {"inputImageUrl": IMAGE_URL, **SMALL, "prompt": "x" * 2000}
    assert_error(api.json(RUN, big), 0, contains="Request body is larger than 1024 bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 100
        yield b'"}'

    streamed = client.post(RUN, content=chunks(), headers={**signed(), "Content-Type": "application/json"})
    assert_error(streamed, 0, contains="larger than 1024 bytes")
    assert_error(client.post(RUN, json=big), 0, status=401), "authentication is decided first"
    assert task_count(client) == 0


# --- work cap ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", [{"max_work": 9 * 32 * 32 * 2}], indirect=True)
def test_explicit_size_over_the_work_cap_is_refused_at_run(client: TestClient):
    api = Api(client)
    message = assert_error(api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL, "steps": "3"}), 0,
                           contains="[numFrames] x width x height x steps is 9 x 32 x 32 x 3 = 27648")
    assert "limit of 18432" in message and "lower numFrames, steps or width/height" in message
    assert task_count(client) == 0
    assert api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}).json()["result"] is True, "at the cap"


@pytest.mark.parametrize("client", [{"max_work": 9 * 32 * 32 * 2}], indirect=True)
def test_a_size_from_the_image_over_the_work_cap_fails_the_task_in_the_worker(client: TestClient, tiny_generator):
    api = Api(client)
    body = {**SMALL, "width": "0", "height": "0"}
    run = api.multipart(RUN, body, {"inputImage": ("in.png", png_bytes(40, 40), "image/png")}).json()
    assert run["result"] is True, "the size is not known before the image is read"
    assert run_worker_once(client, tiny_generator)
    task = api.detail(taskid=run["taskid"])["tasklist"][0]
    assert task["status"] == "task_postprocess_end" and task["pexit"] != "0" and task["outputs"] == []
    assert re.search(r"x width x height x steps is 9 x (\d+) x (\d+) x 2 = \d+, more than the limit of "
                     r"18432", task["debugerror"]), task["debugerror"]
    assert "derived from the input image" in task["debugerror"]
    explicit = api.multipart(RUN, SMALL, {"inputImage": ("in.png", png_bytes(40, 40), "image/png")}).json()
    assert run_worker_once(client, tiny_generator)
    assert api.detail(taskid=explicit["taskid"])["tasklist"][0]["pexit"] == "0", "32x32 asked: at the cap"
