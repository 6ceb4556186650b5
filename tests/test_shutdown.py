"""Graceful stop of a worker: no claim after the stop, the running task finishes within the grace period,
past it the task is interrupted at its next step and requeued; a second signal ends the grace period; the
supervisor waits the grace period plus a margin before SIGKILL; the API drains for the grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from particalize.cli_server import drain_seconds
from particalize.compose_server import open_storage
from particalize.core_options import worker_options, worker_process_options
from server.processes import supervisor
from server.processes.shutdown import StopRequest, stop_on_signals
from server.processes.supervisor import WorkerProcesses
from server.store import Store
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.tasks import create_task
from tests.test_worker import IMAGE_URL, SMALL, WORKER, FakeFetch, Spy, task_dir


@pytest.fixture
def settings(tmp_path: Path, db_url: str):
    return make_settings(tmp_path, db_url, lease_seconds=2.0)


class Paced(Spy):
    """The real generator, slowed to `pace` seconds per step, recording when each step ended and when the
    worker said to stop, and calling `at[step]()` after that step."""

    def __init__(self, inner, pace: float = 0.0, at: dict[int, Callable[[], object]] | None = None) -> None:
        super().__init__(inner)
        self.pace, self.at = pace, at or {}
        self.times: list[float] = []
        self.stopped_at: float | None = None

    def generate(self, params, image, progress=None, should_stop=None, interrupt=None):
        self.times, self.stopped_at = [], None

        def watched() -> bool:
            stop = should_stop()
            if stop and self.stopped_at is None:
                self.stopped_at = time.monotonic()
            return stop

        def paced(p):
            time.sleep(self.pace)
            self.times.append(time.monotonic())
            if p.step in self.at:
                self.at[p.step]()
            if progress is not None:
                progress(p)

        return super().generate(params, image, progress=paced, should_stop=watched, interrupt=interrupt)


def run_until_stopped(store, settings, generator, stop: threading.Event) -> Worker:
    store.workers.register(WORKER, pid=os.getpid(), model="tiny", device="cpu", state="ready", version="t")
    worker = Worker(store, open_storage(settings), generator, worker_options(settings), worker_id=WORKER,
                    fetch=FakeFetch(png_bytes(40, 40)))
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the worker loop ended after the stop"
    return worker


def queue(store: Store, **params):
    return create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL, **params}, image_url=IMAGE_URL)


def test_stop_request_grace_starts_at_the_first_request_and_a_second_one_ends_it():
    stop = StopRequest(grace_seconds=60)
    assert not stop.is_set() and not stop.overdue()
    assert stop.request() is True
    assert stop.is_set() and not stop.overdue() and stop.deadline > time.monotonic() + 59
    assert stop.request() is False
    assert stop.overdue(), "a second request: no more waiting"
    assert StopRequest(grace_seconds=0).request() is True


def test_a_task_that_finishes_within_the_grace_period_completes_and_nothing_more_is_claimed(
    store, settings, tiny_generator
):
    stop = StopRequest(grace_seconds=30)
    running, waiting = queue(store, steps="12"), queue(store)
    spy = Paced(tiny_generator, at={3: stop.request})
    run_until_stopped(store, settings, spy, stop)
    done = store.reads.get(running.id)
    assert done.status == "task_postprocess_end" and done.pexit == "0", done.debugerror
    assert spy.steps == list(range(1, 13)), "every step ran: the stop came well within the grace period"
    assert len(store.reads.outputs([running.id])[running.id]) == 1
    assert store.reads.get(waiting.id).status == "task_queue", "no task claimed after the stop"
    assert spy.calls == 1
    (row,) = store.workers.all()
    assert row.state == "stopping" and row.task_id is None


def test_past_the_grace_period_the_task_is_interrupted_at_its_next_step_and_requeued(
    store, settings, tiny_generator
):
    grace = 0.4
    stop = StopRequest(grace_seconds=grace)
    asked: list[float] = []
    task = queue(store, steps="60")
    spy = Paced(tiny_generator, pace=0.03, at={2: lambda: (asked.append(time.monotonic()), stop.request())})
    run_until_stopped(store, settings, spy, stop)
    back = store.reads.get(task.id)
    assert back.status == "task_queue" and back.attempts == 0 and back.worker_id is None
    assert "the worker stopped" in back.debugoutput
    assert store.reads.outputs([task.id])[task.id] == [] and not task_dir(settings, task).exists()
    last = spy.steps[-1]
    assert 2 < last < 60, f"ran on into the grace period, then stopped (last step {last})"
    assert spy.stopped_at - asked[0] >= grace, "not interrupted before the grace period was over"
    assert spy.times[-2] - asked[0] < grace, "interrupted at the first step that ended after the deadline"


class SlowDecode(Paced):
    """As Paced, with a VAE decode (after the last step) that takes `decode` seconds."""

    def __init__(self, inner, decode: float, **kwargs) -> None:
        super().__init__(inner, **kwargs)
        self.decode = decode

    def generate(self, params, image, progress=None, should_stop=None, interrupt=None):
        video = super().generate(params, image, progress=progress, should_stop=should_stop, interrupt=interrupt)
        time.sleep(self.decode)
        return video


def assert_completed_once(store, settings, task) -> None:
    done = store.reads.get(task.id)
    assert done.status == "task_postprocess_end" and done.pexit == "0", (done.status, done.debugerror)
    (output,) = store.reads.outputs([task.id])[task.id]
    assert (Path(settings.outputs_dir) / output.path).is_file(), "the video is stored"
    statuses = [e.status for e in store.reads.events(task.id)]
    assert statuses.count("task_postprocess_end") == 1 and "task_queue" not in statuses[1:], statuses


def test_a_grace_period_that_ends_during_the_decode_still_stores_the_video_and_completes_once(
    store, settings, tiny_generator
):
    stop = StopRequest(grace_seconds=0.3)
    task = queue(store, steps="4")
    spy = SlowDecode(tiny_generator, decode=1.5, at={3: stop.request})
    started = time.monotonic()
    run_until_stopped(store, settings, spy, stop)
    assert time.monotonic() - started >= 1.5
    assert spy.steps == [1, 2, 3, 4] and spy.calls == 1
    assert_completed_once(store, settings, task)


def test_a_stop_due_at_the_last_step_does_not_throw_the_denoised_video_away(store, settings, tiny_generator):
    stop = StopRequest(grace_seconds=0)
    task = queue(store, steps="4")
    spy = Paced(tiny_generator, at={4: stop.request})
    run_until_stopped(store, settings, spy, stop)
    assert spy.stopped_at is None, "the last step was not interrupted"
    assert_completed_once(store, settings, task)


def test_a_second_request_interrupts_the_task_at_once(store, settings, tiny_generator):
    stop = StopRequest(grace_seconds=60)
    task = queue(store, steps="40")
    spy = Paced(tiny_generator, at={2: stop.request, 5: stop.request})
    run_until_stopped(store, settings, spy, stop)
    assert store.reads.get(task.id).status == "task_queue"
    assert spy.steps[-1] == 5, "stopped right after the step the second request came in"


def test_signals_start_then_end_the_grace_period():
    stop = StopRequest(grace_seconds=60)
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stop_on_signals(stop, signals=(signal.SIGUSR1,))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.wait(5), "the first signal asks the stop"
        assert not stop.overdue(), "... with its grace period"
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not stop.overdue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.overdue(), "the second signal ends the grace period"
    finally:
        signal.signal(signal.SIGUSR1, previous)


CHILD = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, lambda *a: None)
else:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("up", flush=True)
time.sleep(60)
"""


def test_the_supervisor_waits_the_grace_period_and_the_finishing_time_plus_a_margin_before_sigkill(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(supervisor, "STOP_MARGIN_SECONDS", 0.5)
    settings = make_settings(tmp_path, shutdown_grace_seconds=0.7, shutdown_finish_seconds=0.3)
    procs = WorkerProcesses(worker_process_options(settings))
    assert procs.stop_timeout == 1.5
    assert WorkerProcesses(worker_process_options(make_settings(tmp_path))).stop_timeout == 1200 + 120 + 0.5
    for slot, mode in enumerate(("ignore", "obey")):
        child = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"up\n"
        procs.processes[slot] = child
    started = time.monotonic()
    procs._terminate()
    took = time.monotonic() - started
    stubborn, polite = procs.processes[0], procs.processes[1]
    assert polite.returncode == 0, "a worker that stops in time is not killed"
    assert stubborn.returncode == -signal.SIGKILL, "one that does not is killed ..."
    assert 1.5 <= took < 5, f"... only after the grace period plus the margin ({took:.2f}s)"


def test_the_api_drains_requests_for_the_grace_period(tmp_path):
    assert drain_seconds(make_settings(tmp_path, shutdown_grace_seconds=12.5)) == 12.5
