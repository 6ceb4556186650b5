"""SQLite on a disk that fills up mid-run (a small tmpfs this test mounts): the API answers 503 while the
database cannot be written; the worker keeps its video and records it once there is room again; nothing is
left in a running status, and a restarted worker finds nothing to call lost."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from particalize.core_options import worker_options
from server.app import create_app
from server.storage import Storage
from server.store.models import RUNNING
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.test_worker import WORKER, FakeFetch, Spy

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

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        store = client.app.state.services.store
        image = {"inputImage": ("in.png", png_bytes(40, 40), "image/png")}
        body = client.post(RUN, data=SMALL, files=image).json()
        assert body["result"] is True, body
        task_id = int(body["taskid"])

        store.workers.register(WORKER, pid=1, model="tiny", device="cpu", state="ready")
        spy = FillsTheDisk(tiny_generator)
        worker = Worker(store, Storage.from_settings(settings), spy, worker_options(settings), worker_id=WORKER,
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

        restarted = Worker(store, Storage.from_settings(settings), tiny_generator, worker_options(settings),
                           worker_id=WORKER)
        assert store.tasks.recover_orphans(worker_id=WORKER, now=time.time() + 3600) == []
        restarted.recover(own=True)
        events = store.reads.events(task_id)
        assert not any("lost" in e.message for e in events), [e.message for e in events]
        assert [e.status for e in events].count("task_postprocess_end") == 1
        assert client.post(RUN, data=SMALL, files=image).json()["result"] is True, "the API writes again"
