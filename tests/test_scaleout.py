"""Scale-out on a real PostgreSQL: one API process (`particalize serve --workers 0`) and three separate
`particalize worker` processes sharing the database and the outputs directory. 60 tasks are sent at once;
one worker is SIGKILLed and another SIGTERMed while each holds a running task. Every task must end exactly
once, none twice, none lost, each with one complete MP4 of the asked length; the SIGTERMed worker finishes
its task within its grace period and exits 0; the SIGKILLed worker's task is requeued and done by another."""

from __future__ import annotations

import collections
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from benchmarks.harness import ServeProcess, WorkerProcess
from pipeline.video import read_mp4
from server.store import Database, Store
from server.store.models import ACCEPT, CANCEL, QUEUED, RUNNING, TERMINAL, Task
from server.task_view import debug_output
from tests.images import png_bytes

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RUN = "/v1/Run/codexq/Particalize"
TASKS = 60
STEPS = 20
FRAME_COUNTS = (5, 9)
GRACE_SECONDS = 30.0
SIGNAL_AFTER = 40
"""Signal the workers once this many tasks have ended: three share most of the work, one does the rest."""
NODES = ("n1", "n2", "n3")
COMMON_ENV = dict(
    PARTICALIZE_LEASE_SECONDS="3", PARTICALIZE_REQUEUE_LIMIT="2", PARTICALIZE_PROGRESS_INTERVAL_SECONDS="0.1",
    PARTICALIZE_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS), PARTICALIZE_ACCESS_LOG="0",
    PARTICALIZE_MIN_FREE_DISK_BYTES="0",
)


class Cluster:
    """The API replica, the workers by node name, and a store on the shared database to watch them."""

    def __init__(self, data_dir: Path, database_url: str) -> None:
        self.api = ServeProcess(data_dir, database_url=database_url, args=["--workers", "0"],
                                env={**COMMON_ENV, "PARTICALIZE_NODE_NAME": "api"})
        self.workers = {
            node: WorkerProcess(data_dir, database_url=database_url, env={
                **COMMON_ENV, "PARTICALIZE_NODE_NAME": node, "PARTICALIZE_WORKER_CPU_THREADS": "1"})
            for node in NODES
        }
        self.db = Database(database_url)
        self.store = Store(self.db)

    def wait_workers_ready(self, timeout: float = 120) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node, worker in self.workers.items():
                assert worker.proc.poll() is None, f"worker {node} exited:\n{worker.log_text()}"
            listed = self.api.http.get("/healthz").json()["workers"]
            if sum(w["state"] == "ready" for w in listed) == len(self.workers):
                return listed
            time.sleep(0.2)
        raise TimeoutError(f"workers not ready after {timeout}s: {listed}")

    def held_mid_run(self, node: str, timeout: float = 60) -> Task:
        """Wait until `node`'s worker is generating a task with at most half its steps done; that task."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.db.session() as s:
                task = s.scalars(select(Task).where(Task.worker_id == f"{node}/gpu0", Task.status.in_(RUNNING))).first()
            if task is not None and debug_output(task).startswith("step "):
                done = int(debug_output(task).split()[1].split("/")[0])
                if done <= STEPS // 2:
                    return task
            time.sleep(0.005)
        raise TimeoutError(f"{node} never held a task mid-run")

    def terminal_count(self) -> int:
        return sum(self.store.reads.count(status) for status in TERMINAL)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop(signal.SIGKILL)
        self.api.stop()
        self.db.dispose()


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    started = Cluster(tmp_path / "data", postgres_url)
    try:
        started.api.wait_up()
        yield started
    finally:
        started.stop()


def submit_all(base: str, image: bytes) -> list[tuple[str, int]]:
    """TASKS Run requests at once (unsigned multipart with the image attached); (taskid, numFrames) each."""

    def submit(i: int) -> tuple[str, int]:
        frames = FRAME_COUNTS[i % len(FRAME_COUNTS)]
        fields = {"prompt": f"task {i}", "numFrames": str(frames), "steps": str(STEPS), "width": "32",
                  "height": "32", "seed": str(i)}
        answer = httpx.post(f"{base}{RUN}", data=fields, files={"inputImage": ("in.png", image, "image/png")},
                            timeout=60)
        body = answer.json()
        assert answer.status_code == 200 and body["result"] is True, body
        return body["taskid"], frames

    with ThreadPoolExecutor(max_workers=12) as pool:
        return list(pool.map(submit, range(TASKS)))


def download(api: ServeProcess, taskid: str) -> tuple[str, tuple[int, ...]]:
    """The task's one output as its URL serves it, decoded: (taskid, frames' shape)."""
    detail = httpx.post(f"{api.base}/v1/Task/Detail", data={"taskid": taskid}, timeout=30).json()["tasklist"][0]
    (out,) = detail["outputs"]
    video = httpx.get(out["url"], timeout=30)
    assert video.status_code == 200 and len(video.content) == int(out["size"]), (taskid, video.status_code)
    path = api.data_dir / f"check-{taskid}.mp4"
    path.write_bytes(video.content)
    try:
        return taskid, read_mp4(path)[1].shape
    finally:
        path.unlink()


def attribute(events: list[Any]) -> tuple[str | None, list[str]]:
    """Who held the task when it ended, and who held it each time it went back to the queue."""
    holder, requeued_by = None, []
    for event in events:
        if event.status == ACCEPT:
            holder = event.message.removeprefix("worker ")
        elif event.status == QUEUED and holder is not None:
            requeued_by.append(holder)
            holder = None
    return holder, requeued_by


def test_three_workers_survive_a_sigkill_and_a_sigterm_with_every_task_done_exactly_once(cluster: Cluster):
    started = time.monotonic()
    listed = cluster.wait_workers_ready()
    ready_at = time.monotonic()
    assert {w["id"] for w in listed} == {f"{n}/gpu0" for n in NODES}
    assert all(w["version"] and w["taskid"] == "" for w in listed)
    assert cluster.api.http.get("/ready").status_code == 200

    submitted = submit_all(cluster.api.base, png_bytes(48, 40))
    assert len({taskid for taskid, _ in submitted}) == TASKS

    submitted_at = time.monotonic()
    while cluster.terminal_count() < SIGNAL_AFTER and time.monotonic() < submitted_at + 120:
        time.sleep(0.05)
    killed_task = cluster.held_mid_run("n1")
    cluster.workers["n1"].proc.send_signal(signal.SIGKILL)

    termed_task = cluster.held_mid_run("n2")
    cluster.workers["n2"].proc.send_signal(signal.SIGTERM)
    termed_at, termed_mono = time.time(), time.monotonic()
    code = cluster.workers["n2"].proc.wait(GRACE_SECONDS + 10)
    exit_seconds = time.monotonic() - termed_mono
    assert code == 0, cluster.workers["n2"].log_text()
    assert exit_seconds < GRACE_SECONDS, f"the SIGTERMed worker took {exit_seconds:.1f}s to exit"

    deadline = time.monotonic() + 120
    while cluster.terminal_count() < TASKS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.terminal_count() == TASKS == cluster.store.reads.count(), "no task lost"
    done_at = time.monotonic()

    tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    ended_more_than_once, outputs_count = [], {}
    for taskid, _ in submitted:
        task = cluster.store.reads.get(int(taskid))
        events = cluster.store.reads.events(task.id)
        if sum(e.status in TERMINAL for e in events) != 1:
            ended_more_than_once.append((taskid, [e.status for e in events]))
        holder, requeued_by = attribute(events)
        assert holder == task.worker_id, (taskid, holder, task.worker_id)
        outcome = "cancelled" if task.status == CANCEL else "succeeded" if task.pexit == "0" else "failed"
        tally[holder or "-"][outcome] += 1
        for worker_id in requeued_by:
            tally[worker_id]["requeued"] += 1
        outputs_count[taskid] = len(cluster.store.reads.outputs([task.id])[task.id])
    print(f"\n{TASKS} tasks on 3 workers: ready after {ready_at - started:.1f}s, all ended {done_at - ready_at:.1f}s "
          f"later; SIGKILL n1 holding task {killed_task.id}, SIGTERM n2 holding task {termed_task.id} (it exited 0 "
          f"after {exit_seconds:.2f}s)")
    for worker_id in sorted(tally):
        counts = tally[worker_id]
        print(f"  {worker_id}: succeeded {counts['succeeded']}, failed {counts['failed']}, "
              f"cancelled {counts['cancelled']}, requeued {counts['requeued']}")
    assert ended_more_than_once == [], "every task ends exactly once"
    assert sum(c["succeeded"] for c in tally.values()) == TASKS, "every task succeeded"
    assert set(outputs_count.values()) == {1}, "one output each: none ran to completion twice"
    with ThreadPoolExecutor(max_workers=4) as pool:
        shapes = dict(pool.map(lambda sent: download(cluster.api, sent[0]), submitted))
    assert shapes == {taskid: (frames, 32, 32, 3) for taskid, frames in submitted}, "complete MP4s, asked lengths"

    lost = cluster.store.reads.get(killed_task.id)
    lost_holder, lost_requeued_by = attribute(cluster.store.reads.events(lost.id))
    assert lost_requeued_by[0] == "n1/gpu0", "the SIGKILLed worker's task went back to the queue"
    assert lost.attempts >= 2 and lost_holder not in (None, "n1/gpu0") and lost.pexit == "0"

    finished = cluster.store.reads.get(termed_task.id)
    assert (finished.worker_id, finished.attempts) == ("n2/gpu0", 1), "finished within the grace period"
    late_claims = [e for t, _ in submitted for e in cluster.store.reads.events(int(t))
                   if e.status == ACCEPT and e.message == "worker n2/gpu0" and e.at > termed_at + 0.05]
    assert late_claims == [], "no claim after SIGTERM"

    states = {w["id"]: w["state"] for w in cluster.api.http.get("/healthz").json()["workers"]}
    assert states["n2/gpu0"] == "stopped" and states["n1/gpu0"] == "busy", states  # n1 died without a word
    ready = cluster.api.http.get("/ready")
    assert ready.status_code == 200 and ready.json()["workers"] == "1", ready.json()

    print(f"(checked in {time.monotonic() - done_at:.1f}s; {time.monotonic() - started:.1f}s in all)")


def test_sigterm_to_an_api_replica_lets_its_in_flight_requests_finish(tmp_path: Path, postgres_url: str):
    api = ServeProcess(tmp_path / "data", database_url=postgres_url, args=["--workers", "0"], env={
        **COMMON_ENV, "PARTICALIZE_SHUTDOWN_GRACE_SECONDS": "20"})
    try:
        api.wait_up()
        boundary = "slowupload"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        started = threading.Event()

        def slow_body() -> Iterator[bytes]:  # an upload whose body takes 3 s to arrive: in flight at the SIGTERM
            yield head
            started.set()
            time.sleep(3)
            yield png_bytes() + tail

        with ThreadPoolExecutor(max_workers=1) as pool:
            slow = pool.submit(httpx.post, f"{api.base}/v1/File/Upload", content=slow_body(), timeout=30,
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            assert started.wait(10)
            time.sleep(0.2)  # the headers and first chunk have reached the server
            signalled = time.monotonic()
            api.proc.send_signal(signal.SIGTERM)
            answer = slow.result()
        assert answer.status_code == 200 and answer.json()["result"] is True, answer.text
        assert api.proc.wait(20) in (0, -signal.SIGTERM), "a clean exit (uvicorn re-raises the signal it drained on)"
        took = time.monotonic() - signalled
        assert 2 < took < 20, f"it exited {took:.1f}s after SIGTERM: after its request, before the grace period"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{api.base}/health", timeout=5)
    finally:
        api.stop()
