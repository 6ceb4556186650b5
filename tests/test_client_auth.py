"""Authentication as the clients that exist use it: the official Node client (a millisecond nonce, shared by the
calls it makes in parallel), the seed's curl sample (signed once, one NONCE for Run -> Detail -> Kill), a
seconds-nonce script; a wrong signature is still 401; the opt-in strict mode refuses only an identical replay.
And authentication (and the rate limit) is decided from the headers before any body is read."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from particalize.compose_server import build_app
from server.auth import INVALID_CREDENTIALS, sign
from tests.conftest import make_settings

KEY, SECRET = "client-key", "client-secret"
RUN = "/v1/Run/codexq/Particalize"
BODY = {"inputImageUrl": "http://127.0.0.1:9/dog.png", "numFrames": "9", "steps": "2", "width": "32",
        "height": "32"}


def headers(nonce: str, secret: str = SECRET) -> dict[str, str]:
    return {"x-api-key": KEY, "x-nonce": nonce, "x-signature": sign(KEY, secret, nonce)}


def client_for(tmp_path: Path, **overrides: Any) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", api_keys=f"{KEY}:{SECRET}",
                             allow_private_urls=True, **overrides)
    with TestClient(build_app(settings)) as client:
        yield client


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    yield from client_for(tmp_path)


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[TestClient]:
    yield from client_for(tmp_path, replay_protection=True)


def start_running(client: TestClient, taskid: str) -> None:
    store = client.app.state.services.store
    store.tasks.claim_next("testnode/gpu0")
    store.tasks.advance(int(taskid), "testnode/gpu0", "task_start")


def test_ten_parallel_detail_calls_sharing_one_millisecond_nonce_all_succeed(client: TestClient):
    taskid = client.post(RUN, json=BODY, headers=headers(str(int(time.time() * 1000)))).json()["taskid"]
    shared = headers(str(int(time.time() * 1000)))  # Date.now() of ten calls made in one millisecond

    def get_task(_: int):
        return client.post("/v1/Task/Detail", content=json.dumps({"taskid": taskid}),
                           headers={**shared, "Content-Type": "application/json"})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(get_task, range(10)))
    assert [a.status_code for a in answers] == [200] * 10
    assert all(a.json()["result"] is True and a.json()["tasklist"][0]["id"] == taskid for a in answers)


def test_the_seed_sample_signs_once_and_reuses_its_seconds_nonce_for_run_detail_and_kill(client: TestClient):
    once = {**headers(str(int(time.time()))), "Content-Type": "multipart/form-data"}
    run = client.post(RUN, content=json.dumps(BODY), headers=once).json()
    assert run["result"] is True, run
    detail = client.post("/v1/Task/Detail", content=json.dumps({"tasktoken": run["socketaccesstoken"]}),
                         headers=once).json()
    assert detail["result"] is True and detail["tasklist"][0]["status"] == "task_queue"
    start_running(client, run["taskid"])
    kill = client.post("/v1/Task/Kill", content=json.dumps({"socketaccesstoken": run["socketaccesstoken"]}),
                       headers=once).json()
    assert kill["result"] is True and kill["tasklist"][0]["status"] == "task_cancel"


def test_a_wrong_signature_is_still_401(client: TestClient):
    answer = client.post("/v1/Task/List", json={}, headers=headers(str(int(time.time())), secret="wrong"))
    assert answer.status_code == 401
    assert answer.json() == {"result": False, "errors": [{"code": 0, "message": INVALID_CREDENTIALS}]}
    unknown = client.post("/v1/Task/List", json={}, headers={**headers(str(int(time.time()))), "x-api-key": "nope"})
    assert unknown.status_code == 401 and unknown.json() == answer.json(), "no key-existence oracle"


def test_strict_mode_refuses_an_identical_replayed_request_and_nothing_else(strict: TestClient):
    nonce = str(int(time.time() * 1000))
    first = strict.post(RUN, json=BODY, headers=headers(nonce)).json()
    assert first["result"] is True
    replayed = strict.post(RUN, json=BODY, headers=headers(nonce))
    assert replayed.status_code == 401 and "already received" in replayed.json()["errors"][0]["message"]
    # the same nonce on distinct requests (the official client's parallel calls) passes
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(
            lambda body: strict.post("/v1/Task/Detail", json=body, headers=headers(nonce)),
            [{"taskid": first["taskid"]}, {"tasktoken": first["socketaccesstoken"]}, {"taskid": "999"},
             {"taskid": first["taskid"], "tasktoken": first["socketaccesstoken"]}],
        ))
    assert [a.status_code for a in answers] == [200] * 4
    assert strict.post(RUN, json={**BODY, "seed": "1"}, headers=headers(nonce)).json()["result"] is True


# --- authentication before the body ------------------------------------------------------------------------


class Upload:
    """An ASGI request whose body (`chunks` x 64 KiB) is handed over only when the app asks for it."""

    def __init__(self, path: str, headers: dict[str, str], chunks: int) -> None:
        self.chunks, self.pulled = chunks, 0
        self.scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
        self.status = 0
        self.body = b""

    async def receive(self) -> dict[str, Any]:
        self.pulled += 1
        more = self.pulled < self.chunks
        return {"type": "http.request", "body": b"x" * 65536, "more_body": more}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    def run(self, app: Any) -> Upload:
        asyncio.run(app(self.scope, self.receive, self.send))
        return self


def upload_headers(auth: dict[str, str], chunks: int) -> dict[str, str]:
    return {**auth, "content-type": "multipart/form-data; boundary=xyz", "content-length": str(chunks * 65536)}


def test_an_unauthenticated_upload_is_refused_before_any_of_its_body_is_read(client: TestClient, tmp_path: Path):
    nonce = str(int(time.time()))
    refused = ({}, headers(nonce, secret="wrong"), {**headers(nonce), "x-api-key": "nope"}, headers("9" * 65))
    for auth in refused:
        request = Upload("/v1/File/Upload", upload_headers(auth, 160), chunks=160).run(client.app)
        assert request.status == 401, request.body
        assert request.pulled == 0, f"read {request.pulled} body chunks of an unauthenticated request"
    signed = Upload("/v1/File/Upload", upload_headers(headers(nonce), 4), chunks=4).run(client.app)
    assert signed.status == 200 and signed.pulled == 4, "an authenticated body is read (and refused as malformed)"
    for windowed in client_for(tmp_path / "windowed", nonce_unit="auto"):  # the opt-in freshness window
        stale = Upload("/v1/File/Upload", upload_headers(headers("1000"), 160), chunks=160).run(windowed.app)
        assert stale.status == 401 and stale.pulled == 0, stale.body


def test_a_rate_limited_request_is_refused_before_its_body_is_read(tmp_path: Path):
    for client in client_for(tmp_path, rate_limit_per_minute=1):
        nonce = str(int(time.time()))
        assert client.post("/v1/Task/List", json={}, headers=headers(nonce)).json()["result"] is True
        request = Upload(RUN, upload_headers(headers(nonce), 160), chunks=160).run(client.app)
        assert request.status == 200 and json.loads(request.body)["errors"][0]["code"] == 96
        assert request.pulled == 0
