"""Workers woken instead of polling: PostgreSQL announces a queued task, a kill and every event (LISTEN/NOTIFY on the
schema's channels), an idle worker claims when woken and a running task stops when its kill is announced, a lost
listening connection is re-established and its subscribers told that they may have missed something; on SQLite
`serve` wakes its own workers through a pipe. Every wake-up here is given a fallback poll of a minute, so a task
claimed or stopped within the test's few seconds was woken, not found by polling."""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from benchmarks.fleet_sim import SimulatedGenerator
from particalize.compose_server import open_storage
from particalize.core_options import worker_options
from server.processes.wake_pipes import WakePipes
from server.store import Database, Store, upgrade
from server.store.models import TERMINAL
from server.store.notify import CANCEL, EVENTS, QUEUE, Listener
from server.wakeup import Notified, PipeWakeup, PostgresWakeup
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.tasks import create_task
from tests.test_worker import FakeFetch

SMALL = {"numFrames": "5", "width": "32", "height": "32", "seed": "4"}
IMAGE_URL = "https://images.example/dog.png"
WORKER = "testnode/gpu0"
NEVER = 60.0
"""The fallback poll of every wake-up under test: far longer than any wait below."""


def wait_for(check, timeout: float = 20.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[Store]:
    db = Database(postgres_url)
    upgrade(db)
    yield Store(db)
    db.dispose()


class Heard:
    """A listener's notifications per channel, as they arrive."""

    def __init__(self, listener: Listener) -> None:
        self.got: dict[str, queue.Queue[str | None]] = {}
        for channel in listener.channels:
            self.got[channel] = queue.Queue()
            listener.subscribe(channel, self.got[channel].put)

    def next(self, channel: str, timeout: float = 10.0) -> str | None:
        return self.got[channel].get(timeout=timeout)

    def drain(self, channel: str) -> list[str | None]:
        found = []
        while not self.got[channel].empty():
            found.append(self.got[channel].get_nowait())
        return found


def queue_task(store: Store, **params: str):
    return create_task(store, parameters={**SMALL, **params}, image_url=IMAGE_URL)


def test_the_database_announces_a_queued_task_a_kill_and_every_new_status_after_commit(pg_store: Store):
    listener = Listener(pg_store.db, (QUEUE, CANCEL, EVENTS))
    heard = Heard(listener)
    listener.start()
    try:
        for channel in (QUEUE, CANCEL, EVENTS):
            assert heard.next(channel) is None, "on connecting: anything before may have been missed"
        task = queue_task(pg_store, steps="2")
        assert heard.next(QUEUE) == str(task.id) and heard.next(EVENTS) == str(task.id)
        claimed = pg_store.tasks.claim_next(WORKER)
        assert claimed is not None and claimed.id == task.id
        assert heard.next(EVENTS) == str(task.id), "task_accept"
        pg_store.tasks.progress(task.id, WORKER, 1, 2, 0.5)  # a step's progress is not announced ...
        other = queue_task(pg_store, steps="2")
        assert heard.next(EVENTS) == str(other.id), "... so the next announcement is the other task's"
        assert heard.next(QUEUE) == str(other.id)
        assert pg_store.tasks.request_kill(task.id).accepted
        assert heard.next(CANCEL) == str(task.id) and heard.next(EVENTS) == str(task.id)
        assert heard.drain(QUEUE) == [], "a claim or a kill queues nothing"
        assert listener.backend_pid and listener.listening and listener.connections == 1
    finally:
        listener.close()


class CountingWakeup(PostgresWakeup):
    """The worker's real wake-ups, counting its waits (so the test knows it has gone idle)."""

    waits = 0

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        self.waits += 1
        return super().wait(seconds, stop)


@pytest.fixture
def woken_worker(pg_store: Store, tmp_path: Path) -> Iterator[tuple[Worker, CountingWakeup]]:
    """A worker on PostgreSQL whose own polls are a minute apart (progress too): only a wake-up makes it act."""
    settings = make_settings(tmp_path, pg_store.db.url, progress_interval_seconds=NEVER, worker_poll_seconds=NEVER,
                             worker_safety_poll_seconds=NEVER, min_free_disk_bytes=0)
    wakeup = CountingWakeup(pg_store.db, NEVER, NEVER)
    worker = Worker(pg_store, open_storage(settings), SimulatedGenerator(0.2, lambda line: None),
                    worker_options(settings), worker_id=WORKER, fetch=FakeFetch(png_bytes(40, 40)), wakeup=wakeup)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(lambda: wakeup.live and wakeup.waits >= 1, what="the worker to listen and go idle")
    yield worker, wakeup
    stop.set()
    thread.join(10)
    wakeup.close()


def test_an_idle_worker_claims_a_task_queued_while_it_waits_when_woken(woken_worker, pg_store: Store):
    worker, wakeup = woken_worker
    task = queue_task(pg_store, steps="2")
    wait_for(lambda: pg_store.reads.get(task.id).status in TERMINAL, what="the task to be claimed and done")
    done = pg_store.reads.get(task.id)
    assert done.status == "task_postprocess_end" and done.pexit == "0", done.debugerror
    assert worker.tasks_done == 1


def test_a_kill_is_announced_to_the_running_task_which_stops(woken_worker, pg_store: Store):
    worker, _ = woken_worker
    task = queue_task(pg_store, steps="100")  # 20 s of "denoising"
    wait_for(lambda: pg_store.reads.get(task.id).status == "task_start", what="the run to start")
    assert pg_store.tasks.request_kill(task.id).accepted
    wait_for(lambda: worker.tasks_done == 1, what="the run to stop")
    killed = pg_store.reads.get(task.id)
    assert killed.status == "task_cancel", killed.status
    assert re.search(r"Task killed by request during step \d+ of 100", killed.debugoutput), killed.debugoutput


def test_a_lost_listening_connection_comes_back_and_its_subscribers_are_told(
        pg_store: Store, postgres_url: str, caplog: pytest.LogCaptureFixture):
    listener = Listener(pg_store.db, (QUEUE,), name="test listener")
    heard = Heard(listener)
    with caplog.at_level(logging.WARNING, logger="particalize.notify"):
        listener.start()
        assert heard.next(QUEUE) is None
        with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
        assert heard.next(QUEUE) is None, "reconnected: told that notifications may have been missed"
        assert listener.connections == 2
        task = queue_task(pg_store, steps="1")
        assert heard.next(QUEUE) == str(task.id)
    listener.close()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("test listener: notifications from the task store stopped" in m for m in lines) == 1, lines
    assert sum("test listener: notifications from the task store are back" in m for m in lines) == 1, lines


class Silent(Notified):
    """Wake-ups that say they work but never come: only the safety poll finds tasks."""

    @property
    def live(self) -> bool:
        return True


def test_with_no_wake_up_coming_the_safety_poll_still_finds_the_task(store: Store, settings, tmp_path: Path):
    wakeup = Silent(poll_seconds=NEVER, safety_seconds=0.2)
    worker = Worker(store, open_storage(settings), SimulatedGenerator(0.01, lambda line: None),
                    worker_options(settings), worker_id=WORKER, fetch=FakeFetch(png_bytes(40, 40)), wakeup=wakeup)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        task = queue_task(store, steps="1")
        wait_for(lambda: store.reads.get(task.id).status in TERMINAL, what="the safety poll to claim the task")
        assert store.reads.get(task.id).pexit == "0"
    finally:
        stop.set()
        thread.join(10)


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", min_free_disk_bytes=0)


def test_serve_wakes_its_own_workers_on_sqlite_through_a_pipe(store: Store):
    pipes = WakePipes()
    wakeup = PipeWakeup(pipes.open(0), NEVER, NEVER)
    store.tasks.changed.append(pipes.send)
    stop = threading.Event()
    assert wakeup.live and wakeup.idle_seconds() == NEVER and wakeup.kill_read_seconds() == NEVER
    wakeup.clear()
    task = queue_task(store, steps="3")
    started = time.monotonic()
    wakeup.wait(NEVER, stop)
    assert time.monotonic() - started < NEVER / 2, "woken by the Run's queued task"
    killed = threading.Event()
    assert store.tasks.claim_next(WORKER) is not None
    with wakeup.watching(task.id, killed.set):
        assert store.tasks.request_kill(task.id).accepted
        assert killed.wait(10), "the kill reached the worker running the task"
    pipes.close(0)
    wait_for(lambda: not wakeup.live, what="the closed pipe to end the wake-ups")
    assert wakeup.kill_read_seconds() == 0.1, "without wake-ups the kill flag is read at the old pace again"


@pytest.mark.slow
def test_serve_on_sqlite_wakes_its_worker_for_a_run(tmp_path: Path, images):
    """A real `serve` with one worker that looks for tasks by itself only once a minute: a Run's task is accepted
    long before that, so it was woken through serve's pipe."""
    from benchmarks.harness import ServeProcess

    server = ServeProcess(tmp_path / "data", env={
        "PARTICALIZE_WORKER_POLL_SECONDS": str(NEVER), "PARTICALIZE_WORKER_SAFETY_POLL_SECONDS": str(NEVER),
        "PARTICALIZE_ALLOW_PRIVATE_URLS": "1", "PARTICALIZE_ACCESS_LOG": "0", "PARTICALIZE_MIN_FREE_DISK_BYTES": "0",
        "PARTICALIZE_WORKER_CPU_THREADS": "1"})
    try:
        server.wait_ready()
        time.sleep(1.0)  # the worker has looked once at start and waits now
        sent = time.time()  # (its next own look is a minute after the first)
        body = {"inputImageUrl": images.url, **SMALL, "steps": "1"}
        answer = server.http.post("/v1/Run/codexq/Particalize", json=body).json()
        assert answer["result"] is True, answer
        store = Store(Database(server.database_url))
        try:
            wait_for(lambda: store.reads.get(int(answer["taskid"])).accepttime > 0, NEVER * 0.75,
                     "the task to be accepted (woken, not found by the worker's own look a minute later)")
            accepted = store.reads.get(int(answer["taskid"])).accepttime
        finally:
            store.db.dispose()
        assert accepted - sent < NEVER * 0.75
    finally:
        server.stop()
