"""A store outage is an answer, not a 500, and costs no finished work: every route answers 503 in the error
shape with Retry-After; a worker rides out an outage quietly (one log line when it starts, one when it ends),
keeps the video it made and records it once the store is back, even when its lease ran out meanwhile and the
task was requeued (a result lands exactly once, the video is never made twice)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError, OperationalError

from particalize.compose_server import build_app, open_storage, server_options
from particalize.core_options import store_options, worker_options
from server.auth import Authenticator, AuthOptions
from server.services import Services
from server.store import Database, DbNonceStore, Store, TaskLost
from server.store.outage import RETRY_AFTER_SECONDS, StoreHealth, is_outage
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.tasks import create_task
from tests.test_worker import IMAGE_URL, SMALL, WORKER, FakeFetch, Spy

UNREACHABLE_DB = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2"
RUN = "/v1/Run/codexq/Particalize"


def outage_error() -> OperationalError:
    return OperationalError("UPDATE tasks ...", {}, ConnectionRefusedError("connection refused"))


def assert_outage_answer(answer) -> None:
    assert answer.status_code == 503, (answer.status_code, answer.text)
    assert answer.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    body = answer.json()
    assert body["result"] is False and body["errors"][0]["code"] == 0, body
    assert "task store is unavailable" in body["errors"][0]["message"]
    assert "connection refused" not in body["errors"][0]["message"], "no driver details for a client"


def test_outages_are_told_from_bugs():
    assert is_outage(outage_error())
    assert is_outage(OperationalError("INSERT", {}, Exception("database or disk is full")))
    assert not is_outage(IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed")))
    assert not is_outage(ValueError("x"))


def test_every_route_answers_503_with_retry_after_when_the_database_is_down(tmp_path: Path):
    settings = make_settings(tmp_path, UNREACHABLE_DB)
    db = Database(UNREACHABLE_DB)
    services = Services(server_options(settings), Store(db, store_options(settings)), open_storage(settings),
                        Authenticator(AuthOptions(nonce_window_seconds=settings.nonce_window_seconds),
                                      DbNonceStore(db)))
    image = ("in.png", png_bytes(40, 40), "image/png")
    with TestClient(build_app(settings, services=services), raise_server_exceptions=False) as client:
        assert_outage_answer(client.post(RUN, data={"prompt": "x", **SMALL}, files={"inputImage": image}))
        for path in ("/v1/Task/Detail", "/v1/Task/Kill", "/v1/Task/Cancel"):
            assert_outage_answer(client.post(path, json={"taskid": "1"}))
        assert_outage_answer(client.post("/v1/Task/Detail", json={"tasktoken": "abc"}))
        assert_outage_answer(client.get("/healthz"))
        for path in ("/v1/Task/List", "/v1/Task/InputOutputDelete", "/v1/File/Upload"):
            assert_outage_answer(client.post(path, json={"taskid": "1"}) if "Upload" not in path
                                 else client.post(path, files={"file": image}))
        assert_outage_answer(client.get("/files/uploads/0123456789abcdef0123456789abcdef/in.png"))
        assert_outage_answer(client.get("/v1/Task/Events", params={"tasktoken": "abc"}))
        assert_outage_answer(client.get("/metrics"))
        assert client.get("/health").status_code == 503
    db.dispose()


# --- the worker ------------------------------------------------------------------------------------------------


class FlakyStore:
    """The real store, except that every call (of any of its parts) fails as an unreachable database does while
    `down` is set."""

    PARTS = ("tasks", "reads", "uploads", "workers", "callbacks")

    def __init__(self, inner: Any, root: FlakyStore | None = None) -> None:
        self.inner = inner
        self.root = root if root is not None else self
        if root is None:
            self.down = threading.Event()
            self.failed_calls = 0
            self.trip: Callable[[str, tuple, dict], bool] | None = None
            """Asked before every call: True puts the store down from that call on (see `go_down`)."""
            self.down_for = 1.0

    def go_down(self) -> None:
        """Down now, back after `down_for` seconds."""
        self.down.set()
        back = threading.Timer(self.down_for, self.down.clear)
        back.daemon = True
        back.start()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if self.root is self and name in self.PARTS:
            return FlakyStore(value, self)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            trip = self.root.trip
            if trip is not None and not self.root.down.is_set() and trip(name, args, kwargs):
                self.root.trip = None
                self.root.go_down()
            if self.root.down.is_set():
                self.root.failed_calls += 1
                raise outage_error()
            return value(*args, **kwargs)

        return call


class Outage(Spy):
    """The real generator; the store goes down after `at` steps and the video is made during the outage;
    `meanwhile()` runs once the video is made, still during the outage; then the store comes back."""

    def __init__(self, inner, flaky: FlakyStore, at: int, down_for: float, meanwhile=None) -> None:
        super().__init__(inner)
        self.flaky, self.at, self.down_for, self.meanwhile = flaky, at, down_for, meanwhile

    def generate(self, params, image, progress=None, should_stop=None, interrupt=None):
        def watched(p):
            if p.step == self.at:
                self.flaky.down.set()
            if progress is not None:
                progress(p)

        video = super().generate(params, image, progress=watched, should_stop=should_stop)

        def come_back() -> None:
            time.sleep(self.down_for)
            if self.meanwhile is not None:
                self.meanwhile()
            self.flaky.down.clear()

        threading.Thread(target=come_back, daemon=True).start()
        return video


@pytest.fixture
def settings(tmp_path: Path, db_url: str):
    return make_settings(tmp_path, db_url, lease_seconds=1.0)


def run_worker(store: Store, flaky: FlakyStore, settings, generator, until) -> Worker:
    """A worker loop on the flaky store, in a thread, until `until()` (or 60 s)."""
    store.workers.register(WORKER, pid=1, model="tiny", device="cpu", state="ready")
    worker = Worker(flaky, open_storage(settings), generator, worker_options(settings), worker_id=WORKER,  # type: ignore[arg-type]
                    fetch=FakeFetch(png_bytes(40, 40)))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not until() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    return worker


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "particalize.worker" and r.levelno >= logging.WARNING]


def test_a_video_made_during_an_outage_is_recorded_once_the_store_is_back_and_logged_twice(
    store, settings, tiny_generator, caplog
):
    caplog.set_level(logging.INFO)
    flaky = FlakyStore(store)
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL, "steps": "4"}, image_url=IMAGE_URL)
    spy = Outage(tiny_generator, flaky, at=2, down_for=2.5)
    worker = run_worker(store, flaky, settings, spy,
                        until=lambda: store.reads.get(task.id).status == "task_postprocess_end")
    done = store.reads.get(task.id)
    assert done.status == "task_postprocess_end" and done.pexit == "0", done.debugerror
    assert spy.calls == 1, "the video was made once"
    assert len(store.reads.outputs([task.id])[task.id]) == 1
    assert flaky.failed_calls >= 3, "the worker did try the store during the outage"
    lines = outage_lines(caplog)
    assert len(lines) == 2, lines
    assert "unavailable" in lines[0] and "answers again" in lines[1]
    assert worker.health.outages == 1 and not worker.health.down
    assert [e.status for e in store.reads.events(task.id)].count("task_postprocess_end") == 1


def test_a_video_finished_after_its_lease_ran_out_is_kept_not_made_again(store, settings, tiny_generator, caplog):
    flaky = FlakyStore(store)
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL}, image_url=IMAGE_URL)
    requeued: list[Any] = []

    def another_worker_sweeps() -> None:  # the lease (1 s) ran out during the outage; another worker saw it
        requeued.extend(store.tasks.recover_orphans(now=time.time() + 10))

    spy = Outage(tiny_generator, flaky, at=1, down_for=2.0, meanwhile=another_worker_sweeps)
    run_worker(store, flaky, settings, spy, until=lambda: store.reads.get(task.id).status == "task_postprocess_end")
    assert [r.action for r in requeued] == ["requeued"], "the task had gone back to the queue"
    done = store.reads.get(task.id)
    assert done.status == "task_postprocess_end" and done.pexit == "0", done.debugerror
    assert spy.calls == 1, "the finished video was recorded, not made again"
    assert done.worker_id == WORKER and len(store.reads.outputs([task.id])[task.id]) == 1


def test_a_finished_result_wins_over_a_worker_that_took_the_requeued_task_up(store):
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL}, image_url=IMAGE_URL)
    first = store.tasks.claim_next("a/gpu0")
    store.tasks.recover_orphans(now=time.time() + 3600)
    assert store.tasks.claim_next("b/gpu0").id == task.id
    from server.store import NewOutput

    out = [NewOutput("0.mp4", "video/mp4", 10, f"{task.uuid}/0.mp4")]
    done = store.tasks.complete(task.id, "a/gpu0", out, totalcost=0.0, debugoutput="done",
                                claimed_attempt=first.attempts)
    assert done.status == "task_postprocess_end" and done.pexit == "0"
    with pytest.raises(TaskLost):
        store.tasks.advance(task.id, "b/gpu0", "task_output")
    with pytest.raises(TaskLost):
        store.tasks.complete(task.id, "b/gpu0", out, totalcost=0.0, debugoutput="again", claimed_attempt=2)
    assert len(store.reads.outputs([task.id])[task.id]) == 1, "the result landed exactly once"
    with pytest.raises(TaskLost):  # without the attempt it claimed, a worker that lost its task cannot complete it
        store.tasks.complete(task.id, "c/gpu0", out, totalcost=0.0, debugoutput="x")


def test_store_health_logs_once_per_state_change():
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("particalize.test-outage")
    logger.addHandler(Collect())
    health = StoreHealth(logger)
    calls = iter([outage_error()] * 20 + [None])

    def action() -> str:
        error = next(calls)
        if error is not None:
            raise error
        return "ok"

    assert health.retry(action, give_up=lambda: False, first_wait=0.001, max_wait=0.002) == "ok"
    assert len(records) == 2 and health.outages == 1
    with pytest.raises(OperationalError):
        health.retry(lambda: (_ for _ in ()).throw(outage_error()), give_up=lambda: True)
    with pytest.raises(IntegrityError):  # a bug is not retried
        health.retry(lambda: (_ for _ in ()).throw(IntegrityError("x", {}, Exception("y"))), give_up=lambda: False)


def test_right_after_an_outage_a_worker_gives_others_one_lease_before_requeueing_their_tasks(tmp_path: Path):
    from sqlalchemy import update

    from server.store import upgrade
    from server.store.models import Task

    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", lease_seconds=2.0)
    db = Database(settings.sqlalchemy_url)
    upgrade(db)
    store = Store(db, store_options(settings))
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL}, image_url=IMAGE_URL)
    store.tasks.claim_next("other/gpu0")
    worker = Worker(store, open_storage(settings), object(), worker_options(settings), worker_id=WORKER)  # type: ignore[arg-type]
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        worker.health.back_at = time.monotonic()  # the store has just come back ...
        with db.session(write=True) as s:  # ... and the other worker's lease ran out during the outage
            s.execute(update(Task).where(Task.id == task.id).values(lease_expires_at=time.time() - 1))
        time.sleep(1.2)
        assert store.reads.get(task.id).status == "task_accept", "not taken from a worker that could not beat"
        deadline = time.monotonic() + 15
        while store.reads.get(task.id).status == "task_accept" and time.monotonic() < deadline:
            time.sleep(0.1)
        messages = [e.message for e in store.reads.events(task.id) if e.status == "task_queue"]
        assert any("other/gpu0 stopped" in m for m in messages), "requeued once its worker had had a lease to beat"
    finally:
        stop.set()
        thread.join(10)
        db.dispose()


def test_a_video_made_when_the_grace_period_ends_during_an_outage_is_still_recorded(store, settings, tiny_generator):
    from server.processes.shutdown import StopRequest

    flaky = FlakyStore(store)
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL}, image_url=IMAGE_URL)
    stop = StopRequest(grace_seconds=0.2)
    spy = Outage(tiny_generator, flaky, at=2, down_for=1.5, meanwhile=None)
    real_generate = spy.generate

    def generate_then_stop(*args, **kwargs):
        video = real_generate(*args, **kwargs)
        stop.request()  # SIGTERM while the store is down; the grace ends before it is back
        return video

    spy.generate = generate_then_stop  # type: ignore[method-assign]
    store.workers.register(WORKER, pid=1, model="tiny", device="cpu", state="ready")
    worker = Worker(flaky, open_storage(settings), spy, worker_options(settings), worker_id=WORKER,  # type: ignore[arg-type]
                    fetch=FakeFetch(png_bytes(40, 40)))
    started = time.monotonic()
    worker.run(stop)
    assert time.monotonic() - started < 30, "the worker stopped once the video was recorded"
    done = store.reads.get(task.id)
    assert done.status == "task_postprocess_end" and done.pexit == "0", (done.status, done.debugerror)
    assert spy.calls == 1 and len(store.reads.outputs([task.id])[task.id]) == 1


def test_the_api_logs_an_outage_at_most_once_every_few_seconds_not_once_per_request():
    from server.store.outage import ThrottledLog

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("particalize.test-throttled")
    logger.addHandler(Collect())
    throttled = ThrottledLog(logger, every=0.3)
    for _ in range(50):
        throttled.warning("request %s failed", "x")
    time.sleep(0.35)
    throttled.warning("request %s failed", "y")
    assert records == ["request x failed", "request y failed (49 more since the last such line)"]


def test_a_bug_answers_500_and_says_the_connection_closes(tmp_path: Path, monkeypatch):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}")
    with TestClient(build_app(settings), raise_server_exceptions=False) as client:
        store = client.app.state.services.store

        def broken(*args, **kwargs):
            raise IntegrityError("SELECT", {}, Exception("not an outage"))

        monkeypatch.setattr(store.reads, "find_with_outputs", broken)
        answer = client.post("/v1/Task/Detail", json={"taskid": "1"})
        assert answer.status_code == 500 and answer.json()["result"] is False
        assert answer.headers["connection"] == "close", "the client does not reuse a connection the server drops"
        monkeypatch.setattr(store.reads, "find_with_outputs", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
        answer = client.post("/v1/Task/Detail", json={"taskid": "1"})
        assert answer.status_code == 500 and answer.headers["connection"] == "close"


def test_a_live_follower_pauses_through_an_outage_and_misses_no_event(tmp_path: Path):
    import asyncio

    from particalize.compose_server import open_services
    from server.live import TaskFollower
    from server.live_feed import EventFeed
    from server.store import NewOutput

    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}")
    services = open_services(settings)
    store = services.store
    got: list[str] = []

    async def scenario() -> None:
        task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL}, image_url=IMAGE_URL)
        flaky = FlakyStore(store)
        services.store = flaky  # type: ignore[misc]  # the follower's reads (and the feed's) go through it
        feed = EventFeed(flaky, None, poll_seconds=0.05, batch_seconds=0.01)  # type: ignore[arg-type]

        async def follow() -> None:
            async for item in TaskFollower(services, task, feed).events():
                if item is not None:
                    got.append(item.message["type"])

        following = asyncio.create_task(follow())
        while got != ["task_queue"]:
            await asyncio.sleep(0.02)
        flaky.down.set()
        claimed = store.tasks.claim_next(WORKER)  # the worker's writes, to the real store
        store.tasks.complete(task.id, WORKER, [NewOutput("0.mp4", "video/mp4", 10, f"{task.uuid}/0.mp4")],
                             totalcost=0.0, debugoutput="done", claimed_attempt=claimed.attempts)
        while flaky.failed_calls == 0:  # the feed tried to read them, and could not
            await asyncio.sleep(0.02)
        assert got == ["task_queue"] and not following.done(), "an outage is a pause, not the end"
        flaky.down.clear()
        await asyncio.wait_for(following, 20)
        await feed.close()

    try:
        asyncio.run(scenario())
        assert got == ["task_queue", "task_accept", "task_postprocess_end"]
    finally:
        services.store = store  # type: ignore[misc]
        services.close()


# --- the last phase: after the last denoising step ------------------------------------------------------------

def _is(status: str):
    return lambda name, args, kwargs: name == "advance" and args[2] == status


def _last_progress(name: str, args: tuple, kwargs: dict) -> bool:
    return name == "progress" and args[2] == args[3]


AFTER_THE_LAST_STEP = {
    "the VAE decode": _last_progress,
    "task_output_full": _is("task_output_full"),
    "task_end": _is("task_end"),
    "task_postprocess_start": _is("task_postprocess_start"),
    "the MP4 write": None,  # the store goes down while the MP4 is written (the kill-flag read that follows it)
    "complete": lambda name, args, kwargs: name == "complete",
}


def assert_forward_only(store: Store, task_id: int) -> list[str]:
    from server.store.models import ACCEPT, LIFECYCLE, QUEUED

    seen = [e.status for e in store.reads.events(task_id)]
    ranks = [LIFECYCLE.index(s) for s in seen]
    assert ranks == sorted(ranks), f"the status went back: {seen}"
    assert seen.count(ACCEPT) == 1 and seen.count(QUEUED) == 1, f"claimed once, never requeued: {seen}"
    return seen


@pytest.mark.parametrize("where", list(AFTER_THE_LAST_STEP))
def test_an_outage_after_the_last_step_costs_nothing_the_video_is_stored_once_and_recorded(
    store, settings, tiny_generator, monkeypatch, caplog, where
):
    import server.worker.task_run as task_run_module

    caplog.set_level(logging.INFO)
    flaky = FlakyStore(store)
    flaky.trip = AFTER_THE_LAST_STEP[where]
    if flaky.trip is None:
        real_write = task_run_module.write_mp4

        def write_during_an_outage(frames, path, fps):
            written = real_write(frames, path, fps=fps)
            flaky.go_down()
            return written

        monkeypatch.setattr(task_run_module, "write_mp4", write_during_an_outage)
    puts: list[str] = []
    storage = open_storage(settings)
    real_put = storage.put_file
    storage.put_file = lambda local, relpath: (puts.append(relpath), real_put(local, relpath))[1]  # type: ignore[method-assign]
    spy = Spy(tiny_generator)
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL}, image_url=IMAGE_URL)
    worker = Worker(flaky, storage, spy, worker_options(settings), worker_id=WORKER,  # type: ignore[arg-type]
                    fetch=FakeFetch(png_bytes(40, 40)))
    assert worker.run_once() is True
    assert flaky.failed_calls >= 1 and worker.health.outages == 1, "the outage was met"
    done = store.reads.get(task.id)
    assert (done.status, done.pexit, done.attempts) == ("task_postprocess_end", "0", 1), done.debugerror
    assert spy.calls == 1, "one generation"
    assert puts == [f"{task.uuid}/0.mp4"], "stored once"
    (out,) = store.reads.outputs([task.id])[task.id]
    stored = Path(settings.outputs_dir) / out.path
    assert stored.is_file() and stored.stat().st_size == out.size, "the recorded video is the stored one"
    seen = assert_forward_only(store, task.id)
    assert seen[-4:] == ["task_output_full", "task_end", "task_postprocess_start", "task_postprocess_end"]
    assert not any("put back in the queue" in r.getMessage() for r in caplog.records)


def test_a_stopping_worker_whose_finishing_time_ends_in_an_outage_neither_requeues_nor_deletes_its_video(
    store, tmp_path: Path, db_url: str, tiny_generator, caplog
):
    from server.processes.shutdown import StopRequest

    caplog.set_level(logging.INFO)
    settings = make_settings(tmp_path, db_url, shutdown_finish_seconds=0.5)
    flaky = FlakyStore(store)
    flaky.down_for = 600.0  # still down when the worker must give up
    stop = StopRequest(grace_seconds=0.0)

    def at_complete(name: str, args: tuple, kwargs: dict) -> bool:
        if name == "complete":
            stop.request()  # SIGTERM as the video is being recorded
        return name == "complete"

    flaky.trip = at_complete
    spy = Spy(tiny_generator)
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL}, image_url=IMAGE_URL)
    worker = Worker(flaky, open_storage(settings), spy, worker_options(settings), worker_id=WORKER,  # type: ignore[arg-type]
                    fetch=FakeFetch(png_bytes(40, 40)))
    worker.stop_event = stop
    started = time.monotonic()
    worker.run_once()
    flaky.down.clear()
    assert time.monotonic() - started < 20, "given up once the finishing time was over"
    held = store.reads.get(task.id)
    assert (held.status, held.worker_id, held.attempts) == ("task_postprocess_start", WORKER, 1), \
        "not sent back by the worker: if it was not recorded, its lease requeues it"
    assert (Path(settings.outputs_dir) / task.uuid / "0.mp4").is_file(), "the stored video is not deleted"
    assert any("did not answer before the worker had to stop" in r.getMessage() for r in caplog.records)


THEIRS = b"the video worker b made and recorded"
B = "other/gpu0"


def take_over(store: Store, settings, task, *, record: bool) -> None:
    """a's lease ran out (during an outage); b took the requeued task up, made its video and stored it, and
    (`record`) recorded it."""
    from server.store import NewOutput

    store.tasks.recover_orphans(now=time.time() + 3600)
    assert store.tasks.claim_next(B).id == task.id
    for status in ("task_preprocess_start", "task_preprocess_end", "task_assign", "task_start", "task_output_full",
                   "task_end", "task_postprocess_start"):
        store.tasks.advance(task.id, B, status)
    path = Path(settings.outputs_dir) / task.uuid / "0.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(THEIRS)
    if record:
        store.tasks.complete(task.id, B, [NewOutput("0.mp4", "video/mp4", len(THEIRS), f"{task.uuid}/0.mp4")],
                             totalcost=0.0, debugoutput="done by b")


class FailsAfterwards(Spy):
    """Makes the video, then fails (as a VAE decode or MP4 encoder error would)."""

    def generate(self, params, image, progress=None, should_stop=None, interrupt=None):
        super().generate(params, image, progress=progress, should_stop=should_stop, interrupt=interrupt)
        raise RuntimeError("the decode failed")


@pytest.mark.parametrize("then", ["a finishes its video", "a fails", "a is stopped", "b is still storing"])
def test_a_worker_whose_task_was_taken_over_never_deletes_or_overwrites_the_others_output(
    store, settings, tiny_generator, then
):
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL}, image_url=IMAGE_URL)
    stop = threading.Event()

    def takeover() -> None:
        take_over(store, settings, task, record=then != "b is still storing")
        if then == "a is stopped":
            stop.set()

    kind = FailsAfterwards if then == "a fails" else Spy
    last = int(SMALL["steps"])  # a stop comes mid-denoise; the others once a's video is made
    spy = kind(tiny_generator, at_step=1 if then == "a is stopped" else last, action=takeover)
    worker = Worker(store, open_storage(settings), spy, worker_options(settings), worker_id=WORKER,
                    fetch=FakeFetch(png_bytes(40, 40)))
    worker.stop_event = stop
    worker.run_once()
    path = Path(settings.outputs_dir) / task.uuid / "0.mp4"
    assert path.read_bytes() == THEIRS, "b's video is neither deleted nor written over"
    held = store.reads.get(task.id)
    assert held.worker_id == B and held.attempts == 2
    if then == "b is still storing":
        assert held.status == "task_postprocess_start", "not taken back from b, not moved back"
        from server.store import NewOutput

        store.tasks.complete(task.id, B, [NewOutput("0.mp4", "video/mp4", len(THEIRS), f"{task.uuid}/0.mp4")],
                             totalcost=0.0, debugoutput="done by b")
    done = store.reads.get(task.id)
    assert (done.status, done.pexit, done.debugoutput) == ("task_postprocess_end", "0", "done by b")
    (out,) = store.reads.outputs([task.id])[task.id]
    assert out.size == len(THEIRS), "b's record, once"
