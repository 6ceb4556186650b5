"""SQLite on a disk that fills up mid-run (a small tmpfs this test mounts): the API answers 503 while the
database cannot be written; the worker keeps its video and records it once there is room again; nothing is
left in a running status, and a restarted worker finds nothing to call lost. A worker paused for disk space says
so in /ready even when the store cannot take its state (it tells `serve` itself), logs once when it pauses and once
when it goes on, and a task waiting because every worker is paused says why in debugoutput."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from benchmarks.harness import ServeProcess
from particalize.compose_server import build_app, open_storage
from particalize.core_options import store_options, worker_options
from server.store import Database, Store, upgrade
from server.store.models import RUNNING
from server.store.waiting import WAITING_NOTE
from server.task_record import parameters_of
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.tasks import create_task
from tests.test_worker import WORKER, FakeFetch, Spy

PAUSE_LINE = "claims no task: Not enough free disk space"
RESUME_LINE = "has room to write outputs again"

RUN = "/v1/Run/codexq/Particalize"
SMALL = {"prompt": "x", "numFrames": "9", "steps": "4", "width": "32", "height": "32", "seed": "1"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (needs root, as mount does)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the disk is full; the file. Unbuffered: a write cut short leaves nothing behind for close()
    to flush (that would raise ENOSPC again, depending on how much space there was)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_sqlite_on_a_full_disk_answers_503_and_leaves_no_stuck_or_lost_task(small_disk: Path, tmp_path: Path,
                                                                            tiny_generator):
    settings = make_settings(tmp_path, f"sqlite:///{small_disk / 'tasks.db'}", storage_url=str(tmp_path / "out"),
                             min_free_disk_bytes=0, lease_seconds=2.0)
    full, freed = threading.Event(), threading.Event()

    class FillsTheDisk(Spy):
        def generate(self, *args, **kwargs):
            video = super().generate(*args, **kwargs)
            fill(small_disk)
            full.set()
            assert freed.wait(30)
            return video

    with TestClient(build_app(settings), raise_server_exceptions=False) as client:
        store = client.app.state.services.store
        image = {"inputImage": ("in.png", png_bytes(40, 40), "image/png")}
        body = client.post(RUN, data=SMALL, files=image).json()
        assert body["result"] is True, body
        task_id = int(body["taskid"])

        store.workers.register(WORKER, pid=1, model="tiny", device="cpu", state="ready")
        spy = FillsTheDisk(tiny_generator)
        worker = Worker(store, open_storage(settings), spy, worker_options(settings), worker_id=WORKER,
                        fetch=FakeFetch(png_bytes(40, 40)))
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        assert full.wait(60), "the worker ran the task"
        freed.set()  # the generator returns; the worker now cannot write the task's status
        time.sleep(0.5)

        for answer in (client.post(RUN, data=SMALL, files=image),
                       client.post("/v1/Task/Kill", json={"taskid": str(task_id)})):
            assert answer.status_code == 503 and answer.headers["retry-after"], answer.text
            assert answer.json()["result"] is False and "task store is unavailable" in answer.text
        health = client.get("/health")
        assert health.status_code == 503 and "The database's disk is full" in health.text, health.text
        assert store.reads.get(task_id).status in RUNNING, "the worker has not been able to record the end yet"
        assert worker.health.down

        (small_disk / "filler").unlink()  # room again
        deadline = time.monotonic() + 30
        while store.reads.get(task_id).status in RUNNING and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        thread.join(30)

        done = store.reads.get(task_id)
        assert done.status == "task_postprocess_end" and done.pexit == "0", (done.status, done.debugerror)
        assert spy.calls == 1 and len(store.reads.outputs([task_id])[task_id]) == 1
        assert sum(store.reads.count(status) for status in RUNNING) == 0, "nothing left running that no worker owns"

        restarted = Worker(store, open_storage(settings), tiny_generator, worker_options(settings),
                           worker_id=WORKER)
        assert store.tasks.recover_orphans(worker_id=WORKER, now=time.time() + 3600) == []
        restarted.recover(own=True)
        events = store.reads.events(task_id)
        assert not any("lost" in e.message for e in events), [e.message for e in events]
        assert [e.status for e in events].count("task_postprocess_end") == 1
        assert client.post(RUN, data=SMALL, files=image).json()["result"] is True, "the API writes again"
        assert client.get("/health").status_code == 200


def wait_for(condition: Callable[[], object], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


def full_disk_error() -> OperationalError:
    return OperationalError("UPDATE workers ...", {}, sqlite3.OperationalError("database or disk is full"))


def test_a_paused_worker_logs_once_each_way_and_reports_itself_when_the_store_cannot_take_its_state(
        tmp_path: Path, tiny_generator, caplog, monkeypatch):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", min_free_disk_bytes=10**18)
    db = Database(settings.sqlalchemy_url)
    upgrade(db)
    store = Store(db, store_options(settings))
    store.workers.register(WORKER, pid=1, model="tiny", device="cpu", state="ready")
    reports: list[tuple[str, str]] = []
    worker = Worker(store, open_storage(settings), tiny_generator, worker_options(settings),
                    worker_id=WORKER, report=lambda state, detail: reports.append((state, detail)))
    real_state = store.workers.set_state

    def cannot_write(*args, **kwargs):
        raise full_disk_error()

    monkeypatch.setattr(store.workers, "set_state", cannot_write)
    caplog.set_level(logging.WARNING, logger="particalize.worker")
    stop = threading.Event()
    loop = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    loop.start()
    try:
        time.sleep(2.5)  # the worker loop polls every 20 ms and retries the state write every second
        assert sum(PAUSE_LINE in r.getMessage() for r in caplog.records) == 1, "one line, not one a second"
        assert [state for state, _ in reports] == ["paused"] and "Not enough free disk space" in reports[0][1]
        assert store.workers.all()[0].state == "ready", "the store could not take the pause"

        monkeypatch.setattr(store.workers, "set_state", real_state)  # the store can be written again
        wait_for(lambda: store.workers.all()[0].state == "paused", what="the pause recorded once the store takes it")
        monkeypatch.setattr(worker, "options", replace(worker.options, min_free_disk_bytes=0))  # room again
        wait_for(lambda: store.workers.all()[0].state == "ready", what="the worker going on")
        time.sleep(1.0)
        assert sum(PAUSE_LINE in r.getMessage() for r in caplog.records) == 1
        assert sum(RESUME_LINE in r.getMessage() for r in caplog.records) == 1
        assert [state for state, _ in reports] == ["paused", "ready"]
    finally:
        stop.set()
        loop.join(10)
        db.dispose()


def test_a_task_waiting_because_every_worker_is_paused_says_why(tmp_path: Path, tiny_generator, monkeypatch):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", min_free_disk_bytes=10**18)
    db = Database(settings.sqlalchemy_url)
    upgrade(db)
    store = Store(db, store_options(settings))
    store.workers.register(WORKER, pid=1, model="tiny", device="cpu", state="ready")
    before = create_task(store, parameters={"inputImageUrl": "https://images.example/a.png", "numFrames": "5",
                                            "steps": "1", "width": "16", "height": "16"},
                         image_url="https://images.example/a.png")
    assert store.reads.get(before.id).debugoutput == "", "a worker is ready: nothing to explain"
    worker = Worker(store, open_storage(settings), tiny_generator, worker_options(settings),
                    worker_id=WORKER, fetch=FakeFetch(png_bytes(16, 16)))
    try:
        assert worker.run_once() is False  # paused: the disk is below the floor
        during = create_task(store, parameters=dict(parameters_of(before)),
                             image_url="https://images.example/a.png")
        for task_id in (before.id, during.id):
            note = store.reads.get(task_id).debugoutput
            assert note.startswith(f"{WAITING_NOTE} every worker is paused"), note
            assert f"{WORKER}: Not enough free disk space" in note, note

        store.workers.register("other/gpu0", pid=2, model="tiny", device="cpu", state="ready")
        assert create_task(store, parameters={}, image_url="https://images.example/a.png").debugoutput == "", \
            "one worker can still take it"
        store.workers.set_state("other/gpu0", "stopped")

        monkeypatch.setattr(worker, "options", replace(worker.options, min_free_disk_bytes=0))
        assert worker.run_once() is True, "room again: the oldest task runs"
        assert store.reads.get(before.id).pexit == "0"
        assert store.reads.get(during.id).debugoutput == "", "the note is taken off once a worker goes on"
    finally:
        db.dispose()


def test_a_serve_worker_paused_by_a_full_disk_says_so_in_ready_and_logs_once_each_way(small_disk: Path,
                                                                                   tmp_path: Path):
    """The real thing: `particalize serve` with its worker process, SQLite and the outputs on a disk that fills up.
    The worker cannot write its state to the store; it tells serve over its pipe, and /ready believes it."""
    server = ServeProcess(tmp_path / "data", database_url=f"sqlite:///{small_disk / 'tasks.db'}", env={
        "PARTICALIZE_STORAGE_URL": str(small_disk / "outputs"), "PARTICALIZE_MIN_FREE_DISK_BYTES": str(2**20),
        "PARTICALIZE_NODE_NAME": "full", "PARTICALIZE_ACCESS_LOG": "0", "PARTICALIZE_WORKER_CPU_THREADS": "1"})
    try:
        server.wait_ready(timeout=180)
        assert server.http.get("/ready").status_code == 200
        filler = fill(small_disk)

        def ready_says_paused() -> bool:
            answer = server.http.get("/ready")
            return answer.status_code == 503 and "full/gpu0 is paused: Not enough free disk space" in answer.text

        wait_for(ready_says_paused, what="/ready saying the worker is paused")
        assert server.http.get("/healthz").json()["workers"][0]["state"] == "ready", \
            "the store still says ready: it could not be written"
        time.sleep(3)  # the worker loop goes round many times meanwhile
        assert ready_says_paused()
        assert server.log_text().count(PAUSE_LINE) == 1, server.log_text()

        filler.unlink()
        wait_for(lambda: server.http.get("/ready").status_code == 200, what="/ready once there is room")
        time.sleep(1)
        log_text = server.log_text()
        assert log_text.count(PAUSE_LINE) == 1 and log_text.count(RESUME_LINE) == 1, log_text
        run = httpx.post(f"{server.base}/v1/Run/codexq/Particalize", data=SMALL,
                         files={"inputImage": ("in.png", png_bytes(32, 32), "image/png")}, timeout=30).json()
        assert run["result"] is True, run
    finally:
        server.stop()
