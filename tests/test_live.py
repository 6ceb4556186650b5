"""Live progress as Wiro's socket sends it (/ws, /v1/ws) and as Server-Sent Events (/v1/Task/Events): every
lifecycle status in order, string-valued progress objects, the outputs at the end, a late client's replay,
resuming after Last-Event-ID, and the answer to an unknown token."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from particalize.compose_server import build_app
from particalize.core_options import worker_options
from server.store import NewOutput
from server.store.models import (
    ACCEPT,
    ASSIGN,
    END,
    LIFECYCLE,
    OUTPUT,
    OUTPUT_FULL,
    POSTPROCESS_START,
    PREPROCESS_END,
    PREPROCESS_START,
    START,
    TERMINAL,
)
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes

RUN = "/v1/Run/codexq/Particalize"
SMALL = {"numFrames": "5", "steps": "3", "width": "32", "height": "32", "seed": "5"}
PROGRESS_KEYS = ["type", "task", "percentage", "stepCurrent", "stepTotal", "speed", "speedType", "elapsedTime",
                 "remainingTime"]
WORKER_ID = "testnode/gpu0"


@pytest.fixture
def settings(tmp_path: Path, db_url: str):
    return make_settings(tmp_path, db_url)


@pytest.fixture
def client(settings):
    with TestClient(build_app(settings)) as client:
        yield client


def run(client: TestClient, **params: str) -> dict[str, Any]:
    """A task with its image sent as a multipart part (open mode: no keys configured)."""
    answer = client.post(RUN, data={**SMALL, **params}, files={"inputImage": ("dog.png", png_bytes(40, 40),
                                                                             "image/png")})
    body = answer.json()
    assert body["result"] is True, body
    return body


def worker_thread(client: TestClient, settings, generator) -> threading.Thread:
    services = client.app.state.services
    worker = Worker(services.store, services.storage, generator, worker_options(settings),
                    worker_id=WORKER_ID)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    return thread


def receive_all(ws) -> tuple[list[dict[str, Any]], int]:
    """Messages until the server closes the socket; (messages, close code)."""
    messages = []
    while True:
        try:
            messages.append(ws.receive_json())
        except WebSocketDisconnect as closed:
            return messages, closed.code


def statuses(messages: list[dict[str, Any]]) -> list[str]:
    """The message types with repeats (task_output) collapsed."""
    seen: list[str] = []
    for message in messages:
        if not seen or seen[-1] != message["type"]:
            seen.append(message["type"])
    return seen


def assert_wiro_shape(messages: list[dict[str, Any]], taskid: str, token: str, steps: int) -> None:
    for message in messages:
        assert message["id"] == taskid and message["tasktoken"] == token and message["result"] is True
        assert list(message)[:5] == ["type", "id", "tasktoken", "message", "result"]
        if message["type"] not in (OUTPUT, "task_postprocess_end"):
            assert message["message"] is None, message
    progress = [m["message"] for m in messages if m["type"] == OUTPUT]
    assert [p["stepCurrent"] for p in progress] == [str(k) for k in range(1, steps + 1)]
    for p in progress:
        assert list(p) == PROGRESS_KEYS and all(isinstance(v, str) for v in p.values()), p
        assert p["type"] == "progressGenerate" and p["task"] == "Generate" and p["stepTotal"] == str(steps)
        assert p["percentage"] == str(round(100 * int(p["stepCurrent"]) / steps))
        assert p["speedType"] in ("it/s", "s/it") and float(p["speed"]) >= 0
        assert p["elapsedTime"].endswith("s") and p["remainingTime"].endswith("s")
    assert progress[-1]["percentage"] == "100" and progress[-1]["remainingTime"] == "0.0s"


def test_the_socket_sends_every_status_live_with_progress_and_the_outputs(client, settings, tiny_generator):
    task = run(client)
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "task_info", "tasktoken": task["socketaccesstoken"]})
        first = ws.receive_json()
        assert first["type"] == "task_queue", "a client that connects first gets the current state"
        worker = worker_thread(client, settings, tiny_generator)
        rest, code = receive_all(ws)
        worker.join(30)
    messages = [first, *rest]
    assert code == 1000, "closed normally after the terminal status"
    assert statuses(messages) == list(LIFECYCLE)
    assert_wiro_shape(messages, task["taskid"], task["socketaccesstoken"], steps=3)
    end = messages[-1]
    assert end["type"] == "task_postprocess_end" and end["success"] is True and end["exitCode"] == 0
    (out,) = end["message"]
    assert out["name"] == "0.mp4" and out["contenttype"] == "video/mp4" and int(out["size"]) > 0
    detail = client.post("/v1/Task/Detail", json={"taskid": task["taskid"]}).json()["tasklist"][0]
    assert end["message"] == detail["outputs"], "the outputs Task/Detail answers"

    with client.websocket_connect("/v1/ws") as late:
        late.send_json({"type": "task_info", "tasktoken": task["socketaccesstoken"]})
        replay, code = receive_all(late)
    assert replay == messages and code == 1000, "a late client gets the same messages, then the socket closes"


def test_a_late_client_gets_the_current_state_first_then_follows(client):
    """Driven through the store with a fixed clock: the replay stops where the task is, and the progress
    objects' times are exact."""
    task = run(client, steps="4")
    store = client.app.state.services.store
    now = [1000.0]
    store.clock = lambda: now[0]
    taskid = int(task["taskid"])
    assert store.tasks.claim_next(WORKER_ID).id == taskid
    for status in (PREPROCESS_START, PREPROCESS_END, ASSIGN, START):
        store.tasks.advance(taskid, WORKER_ID, status)

    def step(k: int) -> None:
        now[0] = 1000.0 + 2.5 * k
        store.tasks.progress(taskid, WORKER_ID, k, 4, 2.5 * k)

    step(1)
    step(2)
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "task_info", "tasktoken": task["socketaccesstoken"]})
        current = [ws.receive_json() for _ in range(8)]
        assert [m["type"] for m in current] == ["task_queue", ACCEPT, PREPROCESS_START, PREPROCESS_END, ASSIGN,
                                                START, OUTPUT, OUTPUT]
        assert current[-1]["message"] == {
            "type": "progressGenerate", "task": "Generate", "percentage": "50", "stepCurrent": "2",
            "stepTotal": "4", "speed": "2.50", "speedType": "s/it", "elapsedTime": "5.0s", "remainingTime": "5.0s",
        }
        step(3)
        assert ws.receive_json()["message"]["stepCurrent"] == "3", "then new events as they are recorded"
        step(4)
        for status in (OUTPUT_FULL, END, POSTPROCESS_START):
            store.tasks.advance(taskid, WORKER_ID, status)
        store.tasks.complete(taskid, WORKER_ID, [NewOutput("0.mp4", "video/mp4", 123, f"{taskid}/0.mp4")],
                             totalcost=0.0, debugoutput="done")
        rest, code = receive_all(ws)
    assert [m["type"] for m in rest] == [OUTPUT, OUTPUT_FULL, END, POSTPROCESS_START, "task_postprocess_end"]
    assert rest[0]["message"]["percentage"] == "100" and rest[0]["message"]["elapsedTime"] == "10s"
    assert rest[-1]["message"][0]["size"] == "123" and rest[-1]["exitCode"] == 0 and code == 1000


def test_a_killed_task_ends_with_task_cancel(client):
    task = run(client)
    store = client.app.state.services.store
    taskid = int(task["taskid"])
    store.tasks.claim_next(WORKER_ID)
    store.tasks.advance(taskid, WORKER_ID, START)
    store.tasks.request_kill(taskid)
    store.tasks.finish_killed(taskid, WORKER_ID, "Task killed by request after step 0 of 3.")
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "task_info", "tasktoken": task["socketaccesstoken"]})
        messages, code = receive_all(ws)
    assert [m["type"] for m in messages] == ["task_queue", ACCEPT, START, "task_cancel"] and code == 1000
    assert messages[-1]["message"] is None


@pytest.mark.parametrize("first", [
    {"type": "task_info", "tasktoken": "nosuchtokennosuchtokennosuchto"},
    {"type": "task_info"},
    {"type": "hello", "tasktoken": "x"},
    "not json",
])
def test_an_unknown_token_or_a_bad_registration_gets_an_error_and_the_socket_closes(client, first):
    with client.websocket_connect("/ws") as ws:
        if isinstance(first, str):
            ws.send_text(first)
        else:
            ws.send_json(first)
        error = ws.receive_json()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert error["type"] == "task_info" and error["result"] is False and "tasktoken" in error["message"]
    assert closed.value.code == 1008


def sse_events(text: str) -> list[tuple[int, dict[str, Any]]]:
    """(id, data) of each event in a text/event-stream body."""
    found = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "data" in fields:
            found.append((int(fields["id"]), json.loads(fields["data"])))
    return found


def test_server_sent_events_carry_the_same_messages_and_resume_after_last_event_id(client, settings,
                                                                                  tiny_generator):
    task = run(client)
    worker = worker_thread(client, settings, tiny_generator)  # the stream below follows it to the end
    url = f"/v1/Task/Events?tasktoken={task['socketaccesstoken']}"
    answer = client.get(url)
    worker.join(30)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    assert answer.text.startswith("retry: ")
    events = sse_events(answer.text)
    ids = [i for i, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    messages = [m for _, m in events]
    assert statuses(messages) == list(LIFECYCLE) and messages[-1]["type"] in TERMINAL
    assert_wiro_shape(messages, task["taskid"], task["socketaccesstoken"], steps=3)

    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "task_info", "tasktoken": task["socketaccesstoken"]})
        assert receive_all(ws)[0] == messages, "SSE and the socket send the same JSON"

    resumed = sse_events(client.get(url, headers={"Last-Event-ID": str(ids[5])}).text)
    assert resumed == events[6:], "an EventSource reconnecting gets only what it missed"
    assert sse_events(client.get(url, headers={"Last-Event-ID": str(ids[-1])}).text) == []


def test_server_sent_events_for_an_unknown_token_answer_404_with_the_sockets_error(client):
    answer = client.get("/v1/Task/Events?tasktoken=nosuchtoken")
    assert answer.status_code == 404
    assert answer.json()["type"] == "task_info" and answer.json()["result"] is False
    assert client.get("/v1/Task/Events").status_code == 404


def test_a_registration_nested_past_the_json_parser_limit_is_ignored_not_a_crash():
    from server.routes.live import registration_token

    assert registration_token("[" * 100_000 + "]" * 100_000) is None
    assert registration_token('{"type": "task_info", "tasktoken": " abc "}') == "abc"
    assert registration_token('{"type": "other", "tasktoken": "abc"}') is None
