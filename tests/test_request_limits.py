"""Request limits through the API: the per-key rate limit (code 96), a full queue (code 96), the body size
cap, and the side, pixel and work caps (numFrames x width x height x steps) for a size sent and for one the image
implies: at Run when the image is sent or uploaded, in the worker when it is a URL. A refused request creates no
task."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from particalize.compose_server import build_app
from particalize.core_options import worker_options
from server.errors import ApiError
from server.ratelimit import RateLimiter
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.tasks import create_task
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
from tests.test_worker import FakeFetch

ROUTES = ["/v1/Task/Detail", "/v1/Task/Kill", "/v1/Task/Cancel", "/v1/Task/List", "/v1/Tool/Detail",
          "/v1/File/Upload", "/v1/Task/InputOutputDelete", "/v1/Tool/List", "/v1/Tool/Explore", RUN]


def limited_settings(tmp_path: Path, **overrides):
    keys = f"{KEY}:{SECRET},{OTHER_KEY}:{OTHER_SECRET}"
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", api_keys=keys, allow_private_urls=True,
                         **overrides)


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest):
    return limited_settings(tmp_path, **getattr(request, "param", {}))


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(build_app(settings)) as client:
        yield client


def task_count(client: TestClient) -> int:
    return client.app.state.services.store.reads.count()


def retry_seconds(message: str) -> int:
    return int(message.split("retry in ", 1)[1].split(" ", 1)[0])


# --- rate limit ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"rate_limit_per_minute": 3}], indirect=True)
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


@pytest.mark.parametrize("settings", [{"rate_limit_per_minute": 1}], indirect=True)
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
    with TestClient(build_app(settings)) as client:
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


def limiter_of(settings) -> RateLimiter | None:
    """The limiter of the app built for these settings (made when the app is, before it starts)."""
    return build_app(settings).state.rate_limiter


def test_rate_limiter_from_settings_is_off_at_zero():
    assert limiter_of(make_settings(Path("/nonexistent"), rate_limit_per_minute=0)) is None
    assert limiter_of(make_settings(Path("/nonexistent"), rate_limit_per_minute=7)).per_window == 7


# --- queue and body size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"max_queue_length": 1}], indirect=True)
def test_a_full_queue_answers_code_96_and_creates_nothing(client: TestClient):
    api = Api(client)
    first = api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}).json()
    assert first["result"] is True
    assert_error(api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}), 96, contains="queue is full")
    assert task_count(client) == 1
    assert api.json("/v1/Task/Cancel", {"taskid": first["taskid"]}).json()["result"] is True
    assert api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}).json()["result"] is True, "room again"


# --- active tasks per key (Wiro's concurrency limit) --------------------------------------------------------


def other_key() -> dict[str, str]:
    return signed(OTHER_KEY, OTHER_SECRET)


@pytest.mark.parametrize("settings", [{"max_active_tasks_per_key": 2}], indirect=True)
def test_a_key_at_its_active_task_limit_gets_code_96_saying_how_many_and_the_limit(client: TestClient):
    api = Api(client)
    body = {"inputImageUrl": IMAGE_URL, **SMALL}
    first, second = (api.json(RUN, body).json() for _ in range(2))
    assert first["result"] is True and second["result"] is True
    refused = api.json(RUN, body)
    assert refused.status_code == 200
    assert refused.json() == {"result": False, "errors": [{"code": 96, "message": (
        "Too many active tasks for this API key: 2 are queued or running and the limit is 2 per key on this "
        "server. Wait for one to finish (or cancel or kill one), then try again.")}]}
    assert task_count(client) == 2, "a refused Run creates nothing"
    assert api.json(RUN, body, headers=other_key()).json()["result"] is True, "each key has its own limit"

    assert api.json("/v1/Task/Cancel", {"taskid": first["taskid"]}).json()["result"] is True
    third = api.json(RUN, body).json()
    assert third["result"] is True, "a cancelled task is no longer active"
    client.app.state.services.store.tasks.fail(int(second["taskid"]), "ended")
    assert api.json(RUN, body).json()["result"] is True, "nor is one that ended"
    assert_error(api.json(RUN, body), 96, contains="2 are queued or running and the limit is 2")


def test_no_active_task_limit_by_default(client: TestClient, settings):
    assert settings.max_active_tasks_per_key == 0
    api = Api(client)
    assert all(api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}).json()["result"] for _ in range(6))


def test_concurrent_runs_of_one_key_never_exceed_its_active_limit(tmp_path: Path, db_url: str):
    from concurrent.futures import ThreadPoolExecutor

    from server.store import Database, Store, StoreOptions, TooManyActive, upgrade

    db = Database(db_url)
    upgrade(db)
    store = Store(db, StoreOptions(max_active_per_key=3))
    start = threading.Barrier(12)

    def create(_: int) -> bool:
        start.wait()
        try:
            create_task(store, parameters={}, image_url=IMAGE_URL, owner="k1")
        except TooManyActive:
            return False
        return True

    try:
        with ThreadPoolExecutor(12) as pool:
            assert sum(pool.map(create, range(12))) == 3
        assert store.reads.active_count("k1") == 3
    finally:
        db.dispose()


@pytest.mark.parametrize("settings", [{"max_body_bytes": 1024}], indirect=True)
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


@pytest.mark.parametrize("settings", [{"max_work": 9 * 32 * 32 * 2}], indirect=True)
def test_explicit_size_over_the_work_cap_is_refused_at_run(client: TestClient):
    api = Api(client)
    message = assert_error(api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL, "steps": "3"}), 0,
                           contains="[numFrames] x width x height x steps is 9 x 32 x 32 x 3 = 27648")
    assert "limit of 18432" in message and "lower numFrames, steps or width/height" in message
    assert task_count(client) == 0
    assert api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}).json()["result"] is True, "at the cap"


WORK_OVER_CAP = re.compile(r"x width x height x steps is 9 x (\d+) x (\d+) x 2 = \d+, more than the limit of 18432")


def upload_url(api: Api, image: bytes) -> str:
    """The URL File/Upload answers for `image`."""
    return api.multipart("/v1/File/Upload", {}, {"file": ("in.png", image, "image/png")}).json()["list"][0]["url"]


def worker_runs_one(client: TestClient, settings, generator, image: bytes) -> None:
    """One task done by a worker whose image URLs answer `image`."""
    services = client.app.state.services
    worker = Worker(services.store, services.storage, generator, worker_options(settings),
                    worker_id="testnode/gpu0",
                    fetch=FakeFetch(image))
    assert worker.run_once()


@pytest.mark.parametrize("settings", [{"max_work": 9 * 32 * 32 * 2}], indirect=True)
def test_a_size_from_an_uploaded_image_over_the_work_cap_is_refused_at_run(client: TestClient):
    api = Api(client)
    body = {**SMALL, "width": "0", "height": "0"}
    sent = api.multipart(RUN, body, {"inputImage": ("in.png", png_bytes(40, 40), "image/png")})
    message = assert_error(sent, 0, contains="derived from the input image")
    assert WORK_OVER_CAP.search(message), message
    via_upload = api.json(RUN, {**body, "inputImageUrl": upload_url(api, png_bytes(40, 40))})
    assert WORK_OVER_CAP.search(assert_error(via_upload, 0, contains="derived from the input image"))
    assert task_count(client) == 0
    explicit = api.multipart(RUN, SMALL, {"inputImage": ("in.png", png_bytes(40, 40), "image/png")}).json()
    assert explicit["result"] is True, "32x32 asked: at the cap"


@pytest.mark.parametrize("settings", [{"max_work": 9 * 32 * 32 * 2}], indirect=True)
def test_a_size_from_an_image_url_over_the_work_cap_fails_the_task_in_the_worker(client: TestClient, settings,
                                                                                 tiny_generator):
    api = Api(client)
    run = api.json(RUN, {**SMALL, "width": "0", "height": "0", "inputImageUrl": IMAGE_URL}).json()
    assert run["result"] is True, "the size is not known before the worker has fetched the image"
    worker_runs_one(client, settings, tiny_generator, png_bytes(40, 40))
    task = api.detail(taskid=run["taskid"])["tasklist"][0]
    assert task["status"] == "task_postprocess_end" and task["pexit"] != "0" and task["outputs"] == []
    assert WORK_OVER_CAP.search(task["debugerror"]), task["debugerror"]
    assert "derived from the input image" in task["debugerror"]


TOO_TALL = ("Request parameter [height] must be at most 1920, got 38400 (derived from the 100x2000 input image and "
            "width 1920); send a smaller width, or both width and height, or use an image closer to the video's "
            "shape.")
TOO_THIN = ("Request parameter [height] must be at most 1920, got 32000 (derived from the 2x2000 input image and "
            "width 32); send a smaller width, or both width and height, or use an image closer to the video's shape.")
TOO_MANY_PIXELS = ("Request parameter [width] x height must be at most 921600 pixels, got 1920x1920 (derived from "
                   "the 1000x1000 input image and width 1920); send a smaller width, or both width and height "
                   "(multiples of 16).")
DERIVED = [((100, 2000), {"width": "1920"}, TOO_TALL), ((2, 2000), {"width": "32"}, TOO_THIN),
           ((1000, 1000), {"width": "1920"}, TOO_MANY_PIXELS)]


@pytest.mark.parametrize(("image_size", "size", "message"), DERIVED, ids=["too-tall", "too-thin", "too-many-pixels"])
def test_a_size_the_uploaded_image_implies_obeys_the_side_and_pixel_limits_at_run(client: TestClient, image_size,
                                                                                 size, message):
    api = Api(client)
    image = png_bytes(*image_size)
    body = {**SMALL, "height": "0", **size}
    assert assert_error(api.multipart(RUN, body, {"inputImage": ("in.png", image, "image/png")}), 0) == message
    assert assert_error(api.json(RUN, {**body, "inputImageUrl": upload_url(api, image)}), 0) == message
    assert task_count(client) == 0


@pytest.mark.parametrize(("image_size", "size", "message"), DERIVED, ids=["too-tall", "too-thin", "too-many-pixels"])
def test_a_size_an_image_url_implies_ends_the_task_with_the_same_message_in_the_worker(
        client: TestClient, settings, tiny_generator, image_size, size, message):
    api = Api(client)
    run = api.json(RUN, {**SMALL, "height": "0", **size, "inputImageUrl": IMAGE_URL}).json()
    assert run["result"] is True
    worker_runs_one(client, settings, tiny_generator, png_bytes(*image_size))
    task = api.detail(taskid=run["taskid"])["tasklist"][0]
    assert (task["status"], task["pexit"], task["outputs"]) == ("task_postprocess_end", "1", [])
    assert task["debugerror"] == message, "never an internal error"


def test_width_and_height_zero_fit_a_thin_image_within_every_limit(client: TestClient, settings, tiny_generator):
    api = Api(client)
    run = api.multipart(RUN, {**SMALL, "width": "0", "height": "0"},
                        {"inputImage": ("in.png", png_bytes(2, 2000), "image/png")}).json()
    assert run["result"] is True
    assert run_worker_once(client, settings, tiny_generator)
    task = api.detail(taskid=run["taskid"])["tasklist"][0]
    assert task["pexit"] == "0", task["debugerror"]
    width, height = int(task["parameters"]["width"]), int(task["parameters"]["height"])
    assert width % 16 == 0 and height % 16 == 0 and max(width, height) <= 1920 and width * height <= 921600
