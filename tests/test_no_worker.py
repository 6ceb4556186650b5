"""While no worker can serve (every registered worker failed to load its model, none alive), Run answers a code-0
error saying why instead of queueing forever, queued tasks say why in debugoutput, /ready names the reason; work
resumes when a worker comes back. No worker registered yet (`serve --workers 0`, workers elsewhere) still queues.
End to end: `particalize serve` with the real-size preset on this machine's CPU refuses it in seconds, once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks.harness import ServeProcess
from server.store import NoWorker
from server.store.waiting import WAITING_NOTE
from tests.conftest import make_settings
from tests.test_worker import queue_task

REASON = "Not enough memory to load wan2.1-i2v-14b-480p on cpu: it needs ≈103.1 GiB of RAM; weights in /srv/models/x"



@pytest.fixture
def settings(tmp_path: Path, db_url: str):
    return make_settings(tmp_path, db_url)


def test_no_worker_registered_yet_still_queues(store):
    assert queue_task(store).status == "task_queue"


def test_every_worker_failed_refuses_runs_and_notes_the_queued_tasks_until_one_is_back(store):
    waiting = queue_task(store)
    store.workers.register("node/gpu0", pid=1, model="m", device="", state="loading")
    store.workers.set_state("node/gpu0", "failed", detail=REASON)
    assert store.tasks.note_waiting() == 1
    note = store.reads.get(waiting.id).debugoutput
    assert note.startswith(f"{WAITING_NOTE} No worker can run tasks: no worker is running, and the last to start "
                           "failed to load")
    assert "node/gpu0: Not enough memory to load" in note and "/srv/models" not in note, "paths are redacted"
    with pytest.raises(NoWorker) as refused:
        queue_task(store)
    assert "node/gpu0: Not enough memory" in str(refused.value)

    store.workers.register("node/gpu0", pid=2, model="m", device="cpu", state="ready")
    store.tasks.note_waiting()
    assert store.reads.get(waiting.id).debugoutput == "", "the note is taken off"
    assert queue_task(store).status == "task_queue"


def test_a_failed_worker_beside_a_live_one_refuses_nothing(store):
    store.workers.register("a/gpu0", pid=1, model="m", device="", state="failed", detail=REASON)
    store.workers.register("b/gpu0", pid=2, model="m", device="", state="loading")
    assert queue_task(store).status == "task_queue"


def test_a_failure_older_than_a_worker_that_ran_since_is_history_not_the_state(store):
    """A worker that failed yesterday, then workers that ran and stopped: nothing says no worker can serve now."""
    store.workers.register("a/gpu0", pid=1, model="m", device="", state="failed", detail=REASON)
    store.workers.register("b/gpu0", pid=2, model="m", device="cpu", state="ready")
    time.sleep(0.01)
    store.workers.set_state("b/gpu0", "stopped")
    assert queue_task(store).status == "task_queue"
    time.sleep(0.01)
    store.workers.set_state("a/gpu0", "failed", detail=REASON)  # and it fails again, after b: refused again
    with pytest.raises(NoWorker):
        queue_task(store)


def test_serve_with_a_model_too_big_for_this_machine_fails_its_worker_once_and_says_why(tmp_path: Path):
    started = time.monotonic()
    serve = ServeProcess(tmp_path, model="wan2.1-i2v-14b-480p", args=["--random-weights", "--device", "cpu"],
                         env={"PARTICALIZE_ALLOW_PRIVATE_URLS": "1", "PARTICALIZE_ACCESS_LOG": "0",
                              "PARTICALIZE_NODE_NAME": "big"})
    try:
        serve.wait_up()
        deadline, ready = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            ready = serve.http.get("/ready")
            if "failed to load its model" in ready.text:
                break
            assert serve.proc.poll() is None, serve.log_text()
            time.sleep(0.2)
        seconds = time.monotonic() - started
        assert ready is not None and ready.status_code == 503, serve.log_text()
        message = ready.json()["errors"][0]["message"]
        assert "big/gpu0 failed to load its model: Not enough memory to load wan2.1-i2v-14b-480p on cpu" in message

        run = serve.http.post("/v1/Run/codexq/Particalize", json={"inputImageUrl": "http://127.0.0.1:9/dog.png",
                                                                   "prompt": "a dog", "numFrames": 9})
        body = run.json()
        assert run.status_code == 200 and body["result"] is False, body
        assert body["errors"][0]["code"] == 0
        assert body["errors"][0]["message"].startswith("No worker can run tasks: no worker is running, and the last to "
                                                       "start failed")
        assert "Not enough memory" in body["errors"][0]["message"]

        time.sleep(6)  # three restart delays: a restart loop would have started the worker again by now
        log = serve.log_text()
        assert log.count("worker slot 0 started") == 1, log
        assert "could not load the model (see above); it is not restarted" in log
        assert "Traceback" not in log
        print(f"serve: worker refused and /ready said why {seconds:.1f}s after start")
    finally:
        serve.stop()
