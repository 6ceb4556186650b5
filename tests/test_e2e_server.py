"""End to end: the real `particalize serve --model tiny` process on a free port, driven with plain HTTP
exactly as the published page's curl commands do (a JSON text sent as multipart/form-data, HMAC headers
computed as the page computes them, a fresh nonce per request). Includes a SIGKILL in the middle of a
task and a restart, on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.harness import ServeProcess
from pipeline.video import read_mp4
from server.auth import sign
from server.store import Database, Store
from server.store.models import LIFECYCLE, TERMINAL
from tests.images import ImageServer

pytestmark = pytest.mark.slow

KEY, SECRET = "e2e-key", "e2e-secret-value"
RUN = "/v1/Run/codexq/Particalize"
_nonces = itertools.count(int(time.time() * 1000))


def seed_signature(nonce: str) -> str:
    """`echo -n "${YOUR_API_SECRET}${NONCE}" | openssl dgst -sha256 -hmac "${YOUR_API_KEY}"`, as on the page
    (its output line, 'SHA2-256(stdin)= <hex>', is what the page's curl sends)."""
    if shutil.which("openssl") is None:
        return sign(KEY, SECRET, nonce)
    line = subprocess.run(
        ["bash", "-c", 'echo -n "${YOUR_API_SECRET}${NONCE}" | openssl dgst -sha256 -hmac "${YOUR_API_KEY}"'],
        env={**os.environ, "YOUR_API_SECRET": SECRET, "YOUR_API_KEY": KEY, "NONCE": nonce},
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert line.split()[-1] == sign(KEY, SECRET, nonce)
    return line


def seed_headers(nonce: str | None = None, signature: str | None = None) -> dict[str, str]:
    nonce = nonce or str(next(_nonces))
    return {"Content-Type": "multipart/form-data", "x-api-key": KEY, "x-nonce": nonce,
            "x-signature": signature or seed_signature(nonce)}


class Server(ServeProcess):
    """One `particalize serve --model tiny` process with API keys, reached as the page's curl reaches it."""

    def __init__(self, data_dir: Path, database_url: str | None = None, port: int | None = None) -> None:
        super().__init__(data_dir, database_url=database_url, port=port, env=dict(
            PARTICALIZE_API_KEYS=f"{KEY}:{SECRET}", PARTICALIZE_ALLOW_PRIVATE_URLS="1",
            PARTICALIZE_NODE_NAME="e2e", PARTICALIZE_PROGRESS_INTERVAL_SECONDS="0", PARTICALIZE_ACCESS_LOG="0",
        ))

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
        """As the page's curl: -H "Content-Type: multipart/form-data" ... -d '{...}'."""
        return self.http.post(path, content=json.dumps(body), headers=headers or seed_headers())

    def detail(self, **ident: str) -> dict[str, Any]:
        answer = self.post("/v1/Task/Detail", ident)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["result"] is True, body
        return body["tasklist"][0]

    def wait_status(self, taskid: str, statuses: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.detail(taskid=taskid)
            if task["status"] in statuses:
                return task
            time.sleep(0.02)
        raise AssertionError(f"task {taskid} never reached {statuses}; last {task['status']}")

    def task_count(self) -> int:
        return int(self.post("/v1/Task/List", {"start": "0", "limit": "1"}).json()["total"])


def run_body(image_url: str, **overrides: Any) -> dict[str, Any]:
    """The page's Run body, with a small video for the tiny model."""
    body = {"inputImageUrl": image_url, "prompt": "a dog is crystallizing, fracturing, and disintegrating",
            "negativePrompt": "bad quality video", "fps": 16, "width": 32, "height": 32, "numFrames": 9,
            "steps": 8, "scale": "5.0", "flowShift": "5.0"}
    body.update(overrides)
    return body


def process_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("serve") / "data")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_run_poll_every_status_and_download_the_mp4(server: Server, images: ImageServer):
    answer = server.post(RUN, run_body(images.url, steps=30, numFrames=13))
    assert answer.status_code == 200
    run = answer.json()
    assert run["result"] is True and run["errors"] == [] and run["taskid"].isdigit()
    seen: list[str] = []
    for poll in itertools.count():
        task = server.detail(taskid=run["taskid"]) if poll % 2 else server.detail(tasktoken=run["socketaccesstoken"])
        assert task["id"] == run["taskid"] and task["socketaccesstoken"] == run["socketaccesstoken"]
        if not seen or seen[-1] != task["status"]:
            seen.append(task["status"])
        if task["status"] in TERMINAL:
            break
        assert poll < 3000, seen
        time.sleep(0.01)
    assert seen[-1] == "task_postprocess_end" and "task_output" in seen
    assert seen == [s for s in LIFECYCLE if s in seen], f"statuses out of order: {seen}"
    assert "step" in json.dumps(task) or task["debugoutput"].startswith("done")
    assert task["pexit"] == "0" and task["debugerror"] == "" and task["canceltime"] == "0"
    times = [int(task[f]) for f in ("createtime", "accepttime", "preprocessstarttime", "preprocessendtime",
                                    "assigntime", "starttime", "endtime", "postprocessstarttime",
                                    "postprocessendtime")]
    assert all(times) and times == sorted(times)

    store = Store(Database(server.database_url))
    events = [e.status for e in store.reads.events(int(run["taskid"]))]
    assert [s for s in LIFECYCLE if s in events] == list(LIFECYCLE), "the worker went through every status"
    store.db.dispose()

    (out,) = task["outputs"]
    assert out["name"] == "0.mp4" and out["contenttype"] == "video/mp4"
    video = httpx.get(out["url"], timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert len(video.content) == int(out["size"]) == int(task["size"])
    path = server.data_dir / "downloaded.mp4"
    path.write_bytes(video.content)
    meta, frames = read_mp4(path)
    assert frames.shape == (13, 32, 32, 3) and meta["fps"] == 16


def test_kill_during_a_run_and_cancel_while_queued(server: Server, images: ImageServer):
    worker_before = server.wait_ready()
    long = server.post(RUN, run_body(images.url, steps=100)).json()
    queued = server.post(RUN, run_body(images.url)).json()
    server.wait_status(long["taskid"], ("task_output",))
    assert server.detail(taskid=queued["taskid"])["status"] == "task_queue"

    cancel = server.post("/v1/Task/Cancel", {"taskid": queued["taskid"]}).json()
    assert cancel["result"] is True and list(cancel) == ["errors", "tasklist", "result"]
    cancelled = cancel["tasklist"][0]
    assert cancelled["status"] == "task_cancel" and cancelled["canceltime"] != "0"
    assert cancelled["starttime"] == "0" and cancelled["outputs"] == []

    kill = server.post("/v1/Task/Kill", {"socketaccesstoken": long["socketaccesstoken"]}).json()
    assert kill["result"] is True
    killed = kill["tasklist"][0]
    assert killed["status"] == "task_cancel" and killed["canceltime"] != "0", killed
    assert killed["outputs"] == [] and killed["totalcost"] == "0"
    assert "killed" in killed["debugoutput"].lower() and killed["endtime"] != "0"
    deadline = time.monotonic() + 10
    while "during step" not in killed["debugoutput"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker notes where it stopped once it has
        killed = server.detail(taskid=long["taskid"])
    assert killed["status"] == "task_cancel" and killed["outputs"] == []
    assert not (server.data_dir / "outputs" / killed["uuid"]).exists(), "no partial output"
    steps_done = int(killed["debugoutput"].split("during step ")[1].split()[0])
    assert steps_done < 100

    after = server.post(RUN, run_body(images.url)).json()
    assert server.wait_status(after["taskid"], TERMINAL)["pexit"] == "0"
    worker_after = server.wait_ready()
    assert worker_after["pid"] == worker_before["pid"], "the same worker process, model not reloaded"
    assert server.detail(taskid=queued["taskid"])["status"] == "task_cancel", "the cancelled task never ran"


def test_errors_have_wiros_shape_and_status_and_create_nothing(server: Server, images: ImageServer):
    before = server.task_count()

    def error_of(answer: httpx.Response, status: int, code: int) -> str:
        assert answer.status_code == status, answer.text
        body = answer.json()
        assert body["result"] is False and body["errors"][0]["code"] == code, body
        return body["errors"][0]["message"]

    nonce = str(next(_nonces))
    wrong = seed_headers(nonce, signature=sign(KEY, "not-the-secret", nonce))
    error_of(server.post(RUN, run_body(images.url), headers=wrong), 401, 0)
    wrong_random = seed_headers("12345", signature=sign(KEY, "not-the-secret", "12345"))
    error_of(server.post(RUN, run_body(images.url), headers=wrong_random), 401, 0)
    for nonce in ("1000", "12345"):  # the seed: "unix time or any random integer value"
        assert server.post("/v1/Task/List", {}, headers=seed_headers(nonce)).json()["result"] is True, nonce
    assert error_of(server.post("/v1/Task/Detail", {"taskid": "99999999"}), 200, 1) == "There is no task yet."
    malformed = server.http.post(RUN, content=b'{"inputImageUrl": "http://x', headers=seed_headers())
    error_of(malformed, 200, 0)
    assert "[numFrames]" in error_of(server.post(RUN, run_body(images.url, numFrames=80)), 200, 0)
    assert "[steps]" in error_of(server.post(RUN, run_body(images.url, steps=100000)), 200, 0)
    missing = server.http.post("/v1/Nope", content=b"{}", headers=seed_headers())
    assert error_of(missing, 404, 0) == "Error parsing url."
    assert server.task_count() == before


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_task_survives_sigkill_of_the_server_and_completes_after_restart(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, images: ImageServer
):
    database_url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    first = Server(tmp_path / "data", database_url)
    try:
        worker = first.wait_ready()
        run = first.post(RUN, run_body(images.url, steps=40)).json()
        running = first.wait_status(run["taskid"], ("task_output",))
        assert running["status"] == "task_output"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        assert process_gone(int(worker["pid"])), "the worker died with the serve process"
    finally:
        first.stop()
    mid = Store(Database(first.database_url))
    assert mid.reads.get(int(run["taskid"])).status == "task_output", "left running by the dead process"

    second = Server(tmp_path / "data", database_url, port=first.port)
    try:
        second.wait_ready(not_pid=worker["pid"])
        done = second.wait_status(run["taskid"], TERMINAL)
        assert done["status"] == "task_postprocess_end" and done["pexit"] == "0", done
        (out,) = done["outputs"]
        video = httpx.get(out["url"], timeout=30)
        path = tmp_path / "after-restart.mp4"
        path.write_bytes(video.content)
        assert read_mp4(path)[1].shape[0] == 9
        task = mid.reads.get(int(run["taskid"]))
        assert task.attempts == 2, "requeued once"
        requeued = [e for e in mid.reads.events(task.id) if e.status == "task_queue"]
        assert len(requeued) == 2 and "requeued" in requeued[1].message
    finally:
        second.stop()
        mid.db.dispose()
