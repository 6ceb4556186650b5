"""Task/Kill on the warm tiny model with an artificially slow transformer block (as on a GPU, where one 480P
step of the 14B model is ~6.6 s and one block ~0.17 s): the answer says task_cancel at once, the worker stops
within one block, writes no output and runs the next task; a kill during the VAE decode or the MP4 write ends
the same way."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import server.worker.task_run as task_run_module
from particalize.compose_server import build_app
from particalize.core_options import worker_options
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes

BLOCK_SECONDS = 0.2
SMALL = {"numFrames": "9", "width": "32", "height": "32", "seed": "3"}
WORKER = "testnode/gpu0"


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", allow_private_urls=True)


class SlowModules:
    """Forward pre-hooks that make each call of some modules take `seconds`, recording when each call started."""

    def __init__(self, modules, seconds: float) -> None:
        self.seconds = seconds
        self.started: list[float] = []
        self.enabled = True
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args) -> None:
        if self.enabled:
            self.started.append(time.monotonic())
            time.sleep(self.seconds)

    def after(self, moment: float) -> int:
        return sum(1 for t in self.started if t > moment)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def slow_blocks(tiny_generator) -> Iterator[SlowModules]:
    slow = SlowModules(list(tiny_generator.pipe.transformer.blocks), BLOCK_SECONDS)
    yield slow
    slow.remove()


@pytest.fixture
def app(settings, tiny_generator) -> Iterator[tuple[TestClient, Worker]]:
    """The API (no worker processes) and one worker thread on the warm tiny model, sharing the store."""
    with TestClient(build_app(settings)) as client:
        services = client.app.state.services
        worker = Worker(services.store, services.storage, tiny_generator, worker_options(settings), worker_id=WORKER,
                        fetch=lambda url, **kw: (png_bytes(40, 40), "image/png"))
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        yield client, worker
        stop.set()
        thread.join(30)


def run(client: TestClient, **params: str) -> str:
    body = {"inputImageUrl": "http://127.0.0.1:9/dog.png", **SMALL, **params}
    answer = client.post("/v1/Run/codexq/Particalize", json=body).json()
    assert answer["result"] is True, answer
    return answer["taskid"]


def detail(client: TestClient, taskid: str) -> dict:
    return client.post("/v1/Task/Detail", json={"taskid": taskid}).json()["tasklist"][0]


def wait_until(condition, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def output_dir(settings, task: dict) -> Path:
    return Path(settings.outputs_dir) / task["uuid"]


def test_kill_answers_task_cancel_at_once_and_the_worker_stops_within_one_block(app, settings, slow_blocks):
    client, worker = app
    taskid = run(client, steps="50")
    wait_until(lambda: len(slow_blocks.started) >= 3, what="the run to be a few blocks in")

    asked = time.monotonic()
    answer = client.post("/v1/Task/Kill", json={"taskid": taskid}).json()
    answered = time.monotonic()
    killed = answer["tasklist"][0]
    assert answered - asked < 1.0, f"Kill took {answered - asked:.2f}s to answer"
    assert answer["result"] is True and killed["status"] == "task_cancel", killed
    assert killed["endtime"] != "0" and killed["canceltime"] != "0" and killed["totalcost"] == "0"
    assert killed["outputs"] == []

    wait_until(lambda: worker.current_task is None, timeout=10, what="the worker to drop the task")
    stopped = time.monotonic()
    assert slow_blocks.after(answered) <= 1, "the block running at the kill may finish; no block after that starts"
    assert stopped - answered < 4 * BLOCK_SECONDS + 0.5, f"worker stopped {stopped - answered:.2f}s after the kill"

    ended = detail(client, taskid)
    assert ended["status"] == "task_cancel" and ended["outputs"] == [] and ended["endtime"] != "0"
    # The step named is the one whose next block the kill stopped (step 1, or later on a loaded machine where the
    # Kill took longer to arrive): a step runs every block once per transformer pass (two with guidance).
    pipe = worker.generator.pipe
    blocks_per_step = (2 if pipe.do_classifier_free_guidance else 1) * len(pipe.transformer.blocks)
    step = len(slow_blocks.started) // blocks_per_step + 1
    assert f"killed by request during step {step} of 50" in ended["debugoutput"], (ended["debugoutput"], step)
    assert not output_dir(settings, ended).exists(), "no output written"

    slow_blocks.enabled = False
    following = run(client, steps="2")
    wait_until(lambda: detail(client, following)["status"] == "task_postprocess_end", what="the next task")
    assert detail(client, following)["pexit"] == "0", "the warm model runs the next task"


def test_kill_during_the_vae_decode_ends_in_task_cancel_with_no_output(app, settings, tiny_generator):
    client, worker = app
    slow_decode = SlowModules([tiny_generator.pipe.vae.decoder], 0.3)
    try:
        taskid = run(client, steps="2")
        wait_until(lambda: len(slow_decode.started) >= 1, what="the VAE decode to start")
        answer = client.post("/v1/Task/Kill", json={"taskid": taskid}).json()
        killed_at = time.monotonic()
        assert answer["tasklist"][0]["status"] == "task_cancel"
        wait_until(lambda: worker.current_task is None, timeout=10, what="the worker to drop the task")
        assert slow_decode.after(killed_at) <= 1, "the decode is cut short"
    finally:
        slow_decode.remove()
    ended = detail(client, taskid)
    assert ended["status"] == "task_cancel" and ended["outputs"] == [] and ended["endtime"] != "0"
    assert "VAE decode was skipped or cut short" in ended["debugoutput"], ended["debugoutput"]
    assert not output_dir(settings, ended).exists()


def test_kill_during_the_mp4_write_ends_in_task_cancel_with_no_output(app, settings, monkeypatch):
    client, worker = app
    real_write = task_run_module.write_mp4
    taskid_box: list[str] = []

    def write_then_killed(frames, path, fps):
        written = real_write(frames, path, fps=fps)
        answer = client.post("/v1/Task/Kill", json={"taskid": taskid_box[0]}).json()
        assert answer["tasklist"][0]["status"] == "task_cancel"
        return written

    monkeypatch.setattr(task_run_module, "write_mp4", write_then_killed)
    taskid_box.append(run(client, steps="2"))
    wait_until(lambda: detail(client, taskid_box[0])["status"] == "task_cancel", what="the kill")
    wait_until(lambda: worker.current_task is None, timeout=10, what="the worker to drop the task")
    ended = detail(client, taskid_box[0])
    assert ended["outputs"] == [] and ended["size"] == "0" and ended["endtime"] != "0"
    assert "while its MP4 was written" in ended["debugoutput"]
    assert not output_dir(settings, ended).exists(), "nothing reached the storage"


def test_kill_while_the_inputs_are_encoded_stops_before_the_first_step(app, settings, tiny_generator, slow_blocks):
    client, worker = app
    slow_encode = SlowModules([tiny_generator.pipe.vae.encoder], 0.3)
    try:
        taskid = run(client, steps="20")
        wait_until(lambda: len(slow_encode.started) >= 1, what="the VAE encode of the conditioning frames")
        assert client.post("/v1/Task/Kill", json={"taskid": taskid}).json()["tasklist"][0]["status"] == "task_cancel"
        killed_at = time.monotonic()
        wait_until(lambda: worker.current_task is None, timeout=10, what="the worker to drop the task")
        assert slow_encode.after(killed_at) <= 1, "the encode is cut short"
    finally:
        slow_encode.remove()
    assert slow_blocks.started == [], "no transformer block ran"
    ended = detail(client, taskid)
    assert "before the first step" in ended["debugoutput"], ended["debugoutput"]
    assert ended["status"] == "task_cancel" and ended["outputs"] == []
