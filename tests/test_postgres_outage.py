"""PostgreSQL stopped and started mid-run, under a real API process and two real worker processes, on a private
cluster this test starts itself. While the database is down every answer is 503 in Wiro's error shape with
Retry-After, on a kept-alive connection that the next request can use (no reset); once it is back, every task
ends exactly once, none made twice, and each worker logged the outage once, not once a second. Stopped right
after the last denoising step (the video being decoded, written and stored), it costs nothing either: one
claim, one generation, the status never back, the task done with its output once the database is back."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.harness import ServeProcess, WorkerProcess
from particalize.compose_server import open_storage
from particalize.core_options import store_options, worker_options
from server.store import Database, Store, upgrade
from server.store.models import ACCEPT, LIFECYCLE, POSTPROCESS_END, QUEUED, RUNNING, TERMINAL
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.private_postgres import PrivateCluster, unavailable_reason
from tests.tasks import create_task
from tests.test_worker import IMAGE_URL, SMALL, FakeFetch, Spy

pytestmark = [pytest.mark.slow]

RUN = "/v1/Run/codexq/Particalize"
TASKS = 8
STEPS = 100
OUTAGE_SECONDS = 6.0
ENV = dict(
    PARTICALIZE_LEASE_SECONDS="20", PARTICALIZE_PROGRESS_INTERVAL_SECONDS="0.1", PARTICALIZE_ACCESS_LOG="0",
    PARTICALIZE_MIN_FREE_DISK_BYTES="0", PARTICALIZE_WORKER_CPU_THREADS="1",
)


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no private PostgreSQL cluster: {reason}")
    pg = PrivateCluster()
    try:
        pg.start()
        yield pg
    finally:
        pg.remove()


def request(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None):
    """One request on a kept-alive connection: (status, headers, JSON body). A reset raises here."""
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
    answer = conn.getresponse()
    return answer.status, dict(answer.getheaders()), json.loads(answer.read()), answer.will_close


def assert_503(status: int, headers: dict, body: dict, will_close: bool) -> None:
    assert status == 503, (status, body)
    assert headers.get("retry-after") and body["result"] is False and body["errors"][0]["message"], (headers, body)
    assert not will_close, "the connection stays usable"


def test_a_database_outage_mid_run_is_answered_503_and_costs_no_task(cluster: PrivateCluster, tmp_path: Path):
    data = tmp_path / "data"
    api = ServeProcess(data, database_url=cluster.url, args=["--workers", "0"],
                       env={**ENV, "PARTICALIZE_NODE_NAME": "api", "PARTICALIZE_ALLOW_PRIVATE_URLS": "1"})
    workers = [WorkerProcess(data, database_url=cluster.url, env={**ENV, "PARTICALIZE_NODE_NAME": node})
               for node in ("w1", "w2")]
    db = Database(cluster.url)
    store = Store(db)
    try:
        api.wait_up()
        deadline = time.monotonic() + 120
        while sum(w["state"] == "ready" for w in api.http.get("/healthz").json()["workers"]) < len(workers):
            for worker in workers:
                assert worker.proc.poll() is None, worker.log_text()
            assert time.monotonic() < deadline, "the workers never got ready"
            time.sleep(0.1)
        image = png_bytes(40, 40)
        ids = []
        for i in range(TASKS):
            fields = {"prompt": f"task {i}", "numFrames": "13", "steps": str(STEPS), "width": "32", "height": "32",
                      "seed": str(i)}
            body = httpx.post(f"{api.base}{RUN}", data=fields, files={"inputImage": ("in.png", image, "image/png")},
                              timeout=60).json()
            assert body["result"] is True, body
            ids.append(int(body["taskid"]))

        deadline = time.monotonic() + 120
        while sum(store.reads.count(status) for status in RUNNING) < 2:
            for worker in workers:
                assert worker.proc.poll() is None, worker.log_text()
            assert time.monotonic() < deadline, "both workers never ran a task at once"
            time.sleep(0.05)

        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        status, _, _, _ = request(conn, "POST", "/v1/Task/Detail", {"taskid": str(ids[0])})
        assert status == 200
        sock = conn.sock
        cluster.stop()
        down_until = time.monotonic() + OUTAGE_SECONDS
        answers = 0
        while time.monotonic() < down_until:
            assert_503(*request(conn, "POST", "/v1/Task/Detail", {"taskid": str(ids[0])}))
            assert_503(*request(conn, "POST", "/v1/Task/Kill", {"taskid": str(ids[1])}))
            assert_503(*request(conn, "POST", RUN, {"prompt": "x", "inputImageUrl": "http://127.0.0.1:9/x.png"}))
            assert_503(*request(conn, "GET", "/healthz"))
            assert_503(*request(conn, "GET", "/health"))
            answers += 5
            time.sleep(0.2)
        assert conn.sock is sock, "every answer came on the one kept-alive connection"
        cluster.start()
        status, _, body, _ = request(conn, "POST", "/v1/Task/Detail", {"taskid": str(ids[0])})
        assert status == 200 and body["result"] is True, "the API recovered by itself"
        conn.close()

        deadline = time.monotonic() + 240
        while sum(store.reads.count(status) for status in TERMINAL) < TASKS:
            assert time.monotonic() < deadline, "not every task ended"
            time.sleep(0.2)
        for task_id in ids:
            task = store.reads.get(task_id)
            assert task.status == POSTPROCESS_END and task.pexit == "0", (task_id, task.status, task.debugerror)
            events = [e.status for e in store.reads.events(task_id)]
            assert events.count(ACCEPT) == 1, f"task {task_id} was claimed (made) {events.count(ACCEPT)} times"
            assert events.count(POSTPROCESS_END) == 1
            assert len(store.reads.outputs([task_id])[task_id]) == 1
        for worker in workers:
            log = worker.log_text()
            assert log.count("task store is unavailable") == 1, log
            assert log.count("task store answers again") == 1, log
            assert "Traceback" not in log, log
        assert answers >= 10
    finally:
        for worker in workers:
            worker.stop()
        api.stop()
        db.dispose()


@pytest.mark.parametrize("when", ["right after the last step", "during the MP4 write"])
def test_the_database_stopped_in_the_output_phase_costs_no_generation(
    cluster: PrivateCluster, tmp_path: Path, tiny_generator, caplog, monkeypatch, when: str
):
    """The worker runs in this process (so its generations can be counted) on the private cluster, which is
    stopped from inside the run: right after the last denoising step's progress is written (the decode and every
    step after it meet the outage), or once the MP4 is written, after task_postprocess_start (where it was
    found to requeue the task and make the video again)."""
    import server.worker.task_run as task_run_module

    caplog.set_level(logging.INFO)
    settings = make_settings(tmp_path, cluster.url, lease_seconds=20.0, progress_interval_seconds=0.1)
    observer = Database(cluster.url)
    upgrade(observer)
    store = Store(observer, store_options(settings))
    steps = int(SMALL["steps"])
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL}, image_url=IMAGE_URL)
    back = threading.Event()

    def stop_the_database() -> None:
        cluster.stop()

        def start_again() -> None:
            time.sleep(OUTAGE_SECONDS)
            cluster.start()
            back.set()

        threading.Thread(target=start_again, daemon=True).start()

    if when == "during the MP4 write":
        real_write = task_run_module.write_mp4

        def write_then_stop(frames, path, fps):
            written = real_write(frames, path, fps=fps)
            stop_the_database()
            return written

        monkeypatch.setattr(task_run_module, "write_mp4", write_then_stop)
        spy = Spy(tiny_generator)
    else:
        spy = Spy(tiny_generator, at_step=steps, action=stop_the_database)
    worker_db = Database(cluster.url)
    worker = Worker(Store(worker_db, store_options(settings)), open_storage(settings), spy, worker_options(settings),
                    worker_id="pg/gpu0", fetch=FakeFetch(png_bytes(40, 40)))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not back.is_set() or store.reads.get(task.id).status not in TERMINAL:
            assert time.monotonic() < deadline, "the task never ended"
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(30)
        worker_db.dispose()
    assert not thread.is_alive()
    try:
        done = store.reads.get(task.id)
        assert (done.status, done.pexit, done.attempts) == (POSTPROCESS_END, "0", 1), (done.status, done.debugerror)
        assert spy.calls == 1 and spy.steps[-1] == steps, "one generation"
        seen = [e.status for e in store.reads.events(task.id)]
        assert seen.count(ACCEPT) == 1 and seen.count(QUEUED) == 1, f"one claim, never requeued: {seen}"
        ranks = [LIFECYCLE.index(s) for s in seen]
        assert ranks == sorted(ranks), f"the status went back: {seen}"
        (out,) = store.reads.outputs([task.id])[task.id]
        stored = Path(settings.outputs_dir) / out.path
        assert stored.is_file() and stored.stat().st_size == out.size
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "particalize.worker" and r.levelno >= logging.WARNING]
        assert sum("task store is unavailable" in line for line in lines) == 1, lines
        assert sum("task store answers again" in line for line in lines) == 1, lines
        assert not any("put back in the queue" in r.getMessage() for r in caplog.records)
    finally:
        observer.dispose()
