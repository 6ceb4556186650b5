"""The worker: the whole lifecycle on the warm tiny model, kill within one step without leftovers,
failures that end the task (never the worker), graceful stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from particalize.compose_server import open_storage
from particalize.core_options import worker_options
from pipeline.video import read_mp4
from server.netguard import FetchError, UnsafeUrl
from server.store import NewUpload, Store, new_id
from server.store.models import LIFECYCLE, OUTPUT, STAMPS
from server.worker import Worker, failure_reason
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.tasks import create_task

SMALL = {"numFrames": "9", "steps": "3", "width": "32", "height": "32", "seed": "3"}
IMAGE_URL = "https://images.example/dog.png"
WORKER = "testnode/gpu0"


@pytest.fixture
def settings(tmp_path: Path, db_url: str):
    return make_settings(tmp_path, db_url)


class FakeFetch:
    """What the image URL answers (the worker's only network access, replaced here)."""

    def __init__(self, data: bytes = b"", content_type: str = "image/png", error: Exception | None = None):
        self.data, self.content_type, self.error = data, content_type, error
        self.calls: list[dict] = []

    def __call__(self, url: str, **kwargs):
        self.calls.append({"url": url, **kwargs})
        if self.error is not None:
            raise self.error
        return self.data, self.content_type


class Spy:
    """The real generator, with hooks: see each step, act at a step, or fail."""

    def __init__(self, inner, at_step=None, action=None, error: BaseException | None = None):
        self.inner, self.at_step, self.action, self.error = inner, at_step, action, error
        self.device = inner.device
        self.steps: list[int] = []
        self.calls = 0

    # What the worker reads of its generator (server.worker.task_run.Generator), the real one's.
    load_seconds = property(lambda self: self.inner.load_seconds)
    random_weights = property(lambda self: self.inner.random_weights)
    loras = property(lambda self: self.inner.loras)
    loaded_files = property(lambda self: self.inner.loaded_files)
    degraded = property(lambda self: self.inner.degraded)
    interrupt_points = property(lambda self: self.inner.interrupt_points)
    modes = property(lambda self: self.inner.modes)

    def resolve(self, params, image):
        return self.inner.resolve(params, image)

    def generate(self, params, image, progress=None, should_stop=None, interrupt=None):
        self.calls += 1
        self.steps = []
        if self.error is not None:
            raise self.error

        def seen(p):
            self.steps.append(p.step)
            if progress is not None:
                progress(p)
            if p.step == self.at_step and self.action is not None:
                self.action()

        return self.inner.generate(params, image, progress=seen, should_stop=should_stop, interrupt=interrupt)


def make_worker(store, settings, generator, fetch=None) -> Worker:
    return Worker(store, open_storage(settings), generator, worker_options(settings), worker_id=WORKER,
                  fetch=fetch or FakeFetch(png_bytes(40, 40)))


def queue_task(store: Store, **params):
    return create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL, **params}, image_url=IMAGE_URL)


def task_dir(settings, task) -> Path:
    return Path(settings.outputs_dir) / task.uuid


def test_a_task_walks_the_whole_lifecycle_and_leaves_an_mp4(store, settings, tiny_generator):
    fetch = FakeFetch(png_bytes(40, 40))
    worker = make_worker(store, settings, tiny_generator, fetch)
    task = queue_task(store, numFrames="13", steps="4", seed="")
    assert worker.run_once() is True
    assert worker.run_once() is False, "queue empty"
    done = store.reads.get(task.id)
    assert done.status == "task_postprocess_end" and done.pexit == "0" and done.debugerror == ""
    events = [e.status for e in store.reads.events(task.id)]
    assert [s for s in LIFECYCLE if s in events] == list(LIFECYCLE), "every status was passed"
    assert events.count(OUTPUT) == 4, "one progress write per step (progress_interval_seconds=0)"
    steps = [e.message for e in store.reads.events(task.id) if e.status == OUTPUT]
    assert steps == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    stamps = [getattr(done, STAMPS[s]) for s in LIFECYCLE if s in STAMPS]
    assert all(stamps) and stamps == sorted(stamps) and done.canceltime == 0
    assert fetch.calls[0]["url"] == IMAGE_URL and fetch.calls[0]["allow_private"] is False
    assert fetch.calls[0]["max_bytes"] == settings.max_image_bytes
    from server.task_record import parameters_of

    used = parameters_of(done)
    assert used["seed"].isdigit() and (used["width"], used["height"]) == ("32", "32"), "seed and size used"
    (out,) = store.reads.outputs([task.id])[task.id]
    _meta, frames = read_mp4(Path(settings.outputs_dir) / out.path)
    assert frames.shape == (13, 32, 32, 3) and out.size == (Path(settings.outputs_dir) / out.path).stat().st_size
    assert sorted(p.name for p in task_dir(settings, task).iterdir()) == ["0.mp4"], "no temp files"


def test_an_uploaded_image_is_read_from_the_store_not_fetched(store, settings, tiny_generator):
    fetch = FakeFetch(error=AssertionError("must not fetch"))
    upload = NewUpload(new_id(), "in.png", "image/png", png_bytes(32, 32))
    task = create_task(store, parameters=SMALL, image_url="http://testserver/files/uploads/x/in.png", new_upload=upload)
    make_worker(store, settings, tiny_generator, fetch).run_once()
    assert store.reads.get(task.id).pexit == "0" and fetch.calls == []


def test_kill_stops_within_one_step_leaves_nothing_and_the_model_stays_warm(store, settings, tiny_generator):
    task = queue_task(store, steps="20")
    spy = Spy(tiny_generator, at_step=3, action=lambda: store.tasks.request_kill(task.id))
    worker = make_worker(store, settings, spy)
    pipe = tiny_generator.pipe
    worker.run_once()
    assert spy.steps[-1] <= 4, f"stopped after step {spy.steps[-1]}, the kill came during step 3"
    killed = store.reads.get(task.id)
    assert killed.status == "task_cancel" and killed.canceltime > 0 and killed.totalcost == 0
    assert "killed" in killed.debugoutput.lower()
    assert store.reads.outputs([task.id])[task.id] == []
    assert not task_dir(settings, task).exists(), "no partial output"

    spy.at_step = None
    following = queue_task(store)
    worker.run_once()
    assert store.reads.get(following.id).pexit == "0" and spy.calls == 2
    assert tiny_generator.pipe is pipe, "same warm model"


def test_kill_while_the_worker_runs_in_its_own_thread(store, settings, tiny_generator):
    stop = threading.Event()
    worker = make_worker(store, settings, tiny_generator)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        task = queue_task(store, steps="100", width="48", height="48")
        deadline = time.monotonic() + 30
        while store.reads.get(task.id).status != OUTPUT and time.monotonic() < deadline:
            time.sleep(0.01)
        step_at_kill = len([e for e in store.reads.events(task.id) if e.status == OUTPUT])
        assert store.tasks.request_kill(task.id).accepted
        while store.reads.get(task.id).status != "task_cancel" and time.monotonic() < deadline:
            time.sleep(0.01)
        killed = store.reads.get(task.id)
        assert killed.status == "task_cancel"
        steps_done = len([e for e in store.reads.events(task.id) if e.status == OUTPUT])
        assert steps_done - step_at_kill <= 2, "stopped at the next step boundary"
        assert not task_dir(settings, task).exists()
        nxt = queue_task(store)
        while store.reads.get(nxt.id).status != "task_postprocess_end" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.reads.get(nxt.id).pexit == "0"
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("fetch", "expected"),
    [
        (FakeFetch(error=FetchError("https://images.example/dog.png answered HTTP 404.")),
         "Request parameter [inputImageUrl] could not be fetched: https://images.example/dog.png answered HTTP 404"),
        (FakeFetch(error=UnsafeUrl("URL host x resolves to 10.0.0.1, which is not a public address")),
         "Request parameter [inputImageUrl] is refused"),
        (FakeFetch(b"<html>nope</html>", "text/html; charset=utf-8"), "answered text/html, not an image"),
        (FakeFetch(b"GIF89a broken", "image/gif"), "Request parameter [inputImageUrl]"),
        (FakeFetch(png_bytes()[:60], "image/png"), "Request parameter [inputImageUrl]"),
    ],
    ids=["http-error", "ssrf", "html", "broken-gif", "truncated-png"],
)
def test_image_problems_fail_the_task_with_the_reason(store, settings, tiny_generator, fetch, expected):
    task = queue_task(store)
    spy = Spy(tiny_generator)
    make_worker(store, settings, spy, fetch).run_once()
    failed = store.reads.get(task.id)
    assert failed.status == "task_postprocess_end" and failed.pexit == "1" and failed.totalcost == 0
    assert expected in failed.debugerror
    assert spy.calls == 0, "no GPU time for a bad input"
    assert store.reads.outputs([task.id])[task.id] == [] and not task_dir(settings, task).exists()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "Out of memory"),
        (MemoryError(), "Out of memory"),
        (RuntimeError("something broke inside"), "Internal error: RuntimeError: something broke inside"),
    ],
    ids=["cuda-oom", "host-oom", "any-exception"],
)
def test_generation_errors_fail_the_task_and_the_worker_goes_on(store, settings, tiny_generator, error, expected):
    spy = Spy(tiny_generator, error=error)
    worker = make_worker(store, settings, spy)
    task, following = queue_task(store), queue_task(store)
    worker.run_once()
    failed = store.reads.get(task.id)
    assert (failed.status, failed.pexit, failed.totalcost) == ("task_postprocess_end", "1", 0)
    assert expected in failed.debugerror
    spy.error = None
    worker.run_once()
    assert store.reads.get(following.id).pexit == "0"


def test_stopping_the_worker_puts_its_running_task_back_in_the_queue(store, settings, tiny_generator):
    task = queue_task(store, steps="30")
    worker = make_worker(store, settings, tiny_generator)
    stop = threading.Event()
    spy = Spy(tiny_generator, at_step=2, action=stop.set)
    worker.generator = spy
    worker.stop_event = stop
    worker.run_once()
    back = store.reads.get(task.id)
    assert back.status == "task_queue" and back.attempts == 0 and back.accepttime == 0
    assert spy.steps[-1] <= 3 and not task_dir(settings, task).exists()


def test_a_worker_restarting_under_its_id_requeues_what_it_held(store, settings, tiny_generator):
    task = queue_task(store)
    store.tasks.claim_next(WORKER)
    store.tasks.advance(task.id, WORKER, "task_start")  # ... and then the process died
    worker = make_worker(store, settings, tiny_generator)
    worker.recover(own=True)
    assert store.reads.get(task.id).status == "task_queue"
    worker.run_once()
    done = store.reads.get(task.id)
    assert done.pexit == "0" and done.attempts == 2


def test_failure_reasons_are_plain():
    assert failure_reason(RuntimeError("CUDA error: out of memory")).startswith("Out of memory")
    assert failure_reason(ValueError("")) == "Internal error: ValueError: ValueError"


def test_failure_reasons_name_no_server_path():
    reason = failure_reason(FileNotFoundError(2, "No such file or directory", "/srv/particalize/tmp/x.mp4"))
    assert reason == "Internal error: FileNotFoundError: No such file or directory"
    assert "/srv" not in failure_reason(RuntimeError("could not open /srv/particalize/data/x.part for writing"))
