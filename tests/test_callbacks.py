"""callbackUrl: the Task/Detail JSON is POSTed when a task ends, retried with back-off, logged, and a dead
receiver never holds up the queue."""

from __future__ import annotations

import json
import logging
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from particalize.compose_server import build_app
from particalize.core_options import worker_options
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.loopback import LoopbackServer

RUN = "/v1/Run/codexq/Particalize"
SMALL = {"numFrames": "5", "steps": "1", "width": "32", "height": "32", "seed": "1"}


class Receiver(LoopbackServer):
    """A callback endpoint on loopback answering the given statuses in turn (the last one repeats)."""

    def __init__(self, statuses: list[int], delay: float = 0.0) -> None:
        self.statuses, self.delay = statuses, delay
        self.bodies: list[dict] = []
        self.times: list[float] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.bodies.append(json.loads(body))
                receiver.times.append(time.monotonic())
                time.sleep(receiver.delay)
                status = receiver.statuses[min(len(receiver.bodies), len(receiver.statuses)) - 1]
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path, None, allow_private_urls=True, callback_attempts=3,
                         callback_backoff_seconds=0.2, callback_timeout_seconds=0.5)


@pytest.fixture
def client(settings):
    with TestClient(build_app(settings)) as client:
        yield client


def run_task(client: TestClient, settings, callback_url: str, generator) -> str:
    files = {"inputImage": ("in.png", png_bytes(32, 32), "image/png")}
    run = client.post(RUN, data={**SMALL, "callbackUrl": callback_url}, files=files).json()
    services = client.app.state.services
    Worker(services.store, services.storage, generator, worker_options(settings),
           worker_id="t/gpu0").run_once()
    return run["taskid"]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def callback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "particalize.callbacks"]


def test_the_detail_json_is_posted_and_a_failure_retried_with_back_off(client, settings, tiny_generator, caplog):
    caplog.set_level(logging.INFO, logger="particalize.callbacks")
    receiver = Receiver([500, 200])
    try:
        taskid = run_task(client, settings, receiver.url, tiny_generator)
        store = client.app.state.services.store
        wait_for(lambda: store.reads.get(int(taskid)).callback_state == "delivered")
        assert len(receiver.bodies) == 2
        assert receiver.times[1] - receiver.times[0] >= 0.15, "waited before retrying"
        detail = client.post("/v1/Task/Detail", json={"taskid": taskid}).json()
        assert receiver.bodies[1] == detail, "the same JSON Task/Detail answers"
        assert detail["tasklist"][0]["status"] == "task_postprocess_end"
        assert detail["tasklist"][0]["callbackurl"] == receiver.url
        wait_for(lambda: any(f"task {taskid} attempt 2" in m and "delivered" in m for m in callback_lines(caplog)),
                 timeout=5)  # logged just after the outcome is recorded
        assert any(f"task {taskid} attempt 1" in m and "HTTP 500" in m and "retrying" in m
                   for m in callback_lines(caplog))
    finally:
        receiver.close()


def test_a_dead_callback_gives_up_and_never_holds_the_queue(tmp_path: Path, tiny_generator, caplog):
    """Told by order, not by a stopwatch: the second task is done while the first one's callback is still being
    tried (its 3 attempts of 4 s each take 12 s or more), whatever the machine's load."""
    caplog.set_level(logging.INFO, logger="particalize.callbacks")
    settings = make_settings(tmp_path, None, allow_private_urls=True, callback_attempts=3,
                             callback_backoff_seconds=0.2, callback_timeout_seconds=4.0)
    slow = Receiver([200], delay=30.0)  # answers after the 4 s timeout: every attempt fails
    try:
        with TestClient(build_app(settings)) as client:
            first = run_task(client, settings, slow.url, tiny_generator)
            second = run_task(client, settings, "", tiny_generator)
            store = client.app.state.services.store
            assert store.reads.get(int(second)).status == "task_postprocess_end"
            assert store.reads.get(int(first)).callback_state != "failed", "the worker did not wait for the callback"
            wait_for(lambda: store.reads.get(int(first)).callback_state == "failed", timeout=90)
            task = store.reads.get(int(first))
            assert task.callback_attempts == 3 and task.status == "task_postprocess_end" and task.pexit == "0"
            wait_for(lambda: any("giving up after 3 attempts" in m for m in callback_lines(caplog)),
                     timeout=5)  # logged just after the outcome is recorded
    finally:
        slow.close()


def test_a_cancelled_task_calls_back_too(client):
    receiver = Receiver([204])
    try:
        run = client.post(RUN, json={**SMALL, "inputImageUrl": "http://127.0.0.1:9/x.png",
                                     "callbackUrl": receiver.url}).json()
        client.post("/v1/Task/Cancel", json={"taskid": run["taskid"]})
        wait_for(lambda: len(receiver.bodies) == 1)
        assert receiver.bodies[0]["tasklist"][0]["status"] == "task_cancel"
    finally:
        receiver.close()
