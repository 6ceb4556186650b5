"""The callback sender is woken instead of polling the store every 0.2 s: by a task ended in its own process, by a
task a worker of `serve` reports ending (its pipe), by PostgreSQL's announcement of a new status, and by its own
retries falling due; otherwise it looks once every safety period. Every sender here has a safety period of a minute,
so a callback sent within the test's few seconds was woken, not found by the safety look."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.callbacks import CallbackDispatcher, CallbackOptions
from server.store import Database, NewOutput, Store, upgrade
from server.store.commits import SqliteCommits
from server.store.models import CANCEL, OUTPUT, POSTPROCESS_END, QUEUED
from server.store.notify import EVENTS, Listener
from server.worker.entry import report_ends
from server.worker_reports import ENDED, WorkerReports, pipe_reporter
from tests.tasks import create_task

NEVER = 60.0
WORKER = "testnode/gpu0"
HOOK = "https://hooks.example/done"


def wait_for(check, timeout: float = 20.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Posts:
    """A callback receiver answering the given statuses in turn (the last one repeats)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.sent: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, url: str, body: dict[str, Any], **_: Any) -> int:
        with self.lock:
            task = body["tasklist"][0] if "tasklist" in body else body  # Task/Detail's answer, or the test's own
            self.sent.append((url, int(task["id"])))
            return self.statuses[min(len(self.sent), len(self.statuses)) - 1]


def sender(store: Store, posts: Posts, listener: Listener | None = None,
           commits: SqliteCommits | None = None) -> CallbackDispatcher:
    return CallbackDispatcher(store, lambda task: {"id": task.id}, CallbackOptions(), post=posts,
                              listener=listener, commits=commits, safety_seconds=NEVER, batch_seconds=0.05).start()


def finish(store: Store, callback_url: str = HOOK) -> int:
    """A task run to its end by a worker (the store given: the sender's own, or another process's)."""
    task = create_task(store, parameters={"numFrames": "5", "steps": "1"}, image_url="https://images.example/a.png",
                       callback_url=callback_url)
    claimed = store.tasks.claim_next(WORKER)
    assert claimed is not None and claimed.id == task.id
    store.tasks.complete(task.id, WORKER, [NewOutput("0.mp4", "video/mp4", 1, "x/0.mp4")], totalcost=0.0,
                         debugoutput="done")
    return task.id


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    db = Database(f"sqlite:///{tmp_path / 'tasks.db'}")
    upgrade(db)
    yield Store(db)
    db.dispose()


def test_a_task_ended_in_the_senders_process_is_called_back_at_once_and_an_idle_sender_does_not_poll(
        sqlite_store: Store):
    posts = Posts([200])
    callbacks = sender(sqlite_store, posts)
    sqlite_store.tasks.changed.append(callbacks.task_changed)
    try:
        wait_for(lambda: callbacks.looks >= 1, what="the first look")
        time.sleep(0.5)
        assert callbacks.looks == 1, "idle: no look before the safety period"
        task_id = finish(sqlite_store)
        wait_for(lambda: posts.sent == [(HOOK, task_id)], what="the callback")
        wait_for(lambda: sqlite_store.reads.get(task_id).callback_state == "delivered", what="it to be recorded")
    finally:
        callbacks.stop()


def test_a_failed_callback_is_retried_when_its_back_off_ends_not_at_the_safety_look(sqlite_store: Store):
    posts = Posts([500, 200])
    sqlite_store.callbacks.backoff_seconds = 0.3
    callbacks = sender(sqlite_store, posts)
    sqlite_store.tasks.changed.append(callbacks.task_changed)
    try:
        task_id = finish(sqlite_store)
        wait_for(lambda: sqlite_store.reads.get(task_id).callback_state == "delivered", what="the retry")
        assert posts.sent == [(HOOK, task_id), (HOOK, task_id)]
    finally:
        callbacks.stop()


def test_a_cancelled_queued_task_wakes_the_sender_too(sqlite_store: Store):
    posts = Posts([200])
    callbacks = sender(sqlite_store, posts)
    seen: list[tuple[int, str]] = []
    sqlite_store.tasks.changed += [callbacks.task_changed, lambda task_id, status: seen.append((task_id, status))]
    try:
        task = create_task(sqlite_store, parameters={"numFrames": "5"}, image_url="https://images.example/a.png",
                           callback_url=HOOK)
        assert sqlite_store.tasks.cancel_if_queued(task.id)[1]
        wait_for(lambda: posts.sent == [(HOOK, task.id)], what="the callback of the cancelled task")
        assert seen == [(task.id, QUEUED), (task.id, CANCEL)]
    finally:
        callbacks.stop()


def test_a_worker_of_serve_reports_the_tasks_it_ends_over_its_pipe(sqlite_store: Store):
    """The worker process's store tells `report_ends` of each end; the line crosses the pipe; serve's WorkerReports
    tells its listeners, which wake the sender (server/app.py)."""
    reports = WorkerReports()
    ended: list[int] = []
    reports.ended.append(ended.append)
    reports.report(WORKER, "paused", "no room")
    read_fd, write_fd = os.pipe()
    reader = threading.Thread(target=reports.read_pipe, args=(read_fd,), daemon=True)
    reader.start()
    tell = report_ends(pipe_reporter(write_fd, WORKER))
    tell(7, OUTPUT)  # not an end: nothing said
    tell(7, POSTPROCESS_END)
    tell(8, CANCEL)
    wait_for(lambda: ended == [7, 8], what="the ends to cross the pipe")
    assert reports.paused() == {WORKER: "no room"}, "an end is no state of the worker"
    os.close(write_fd)
    reader.join(5)
    assert reports.paused() == {}, "the pipe closed: the worker's word no longer holds"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Any, Posts, str]]:
    """`serve`'s app on SQLite (no workers of its own) whose callback sender posts to a Posts and looks for nothing
    without a reason from now on: (the test client, the posts, the database URL)."""
    from fastapi.testclient import TestClient

    from particalize.compose_server import build_app
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, None)
    with TestClient(build_app(settings)) as client:
        callbacks: CallbackDispatcher = client.app.state.callbacks
        posts = Posts([200])
        callbacks.post, callbacks.safety_seconds = posts, NEVER
        wait_for(lambda: callbacks.looks >= 1, what="the sender's first look")  # a wake before it would be cleared
        callbacks.wake()  # the new safety period from now on
        wait_for(lambda: callbacks.looks >= 2, what="a look under the new safety period")
        yield client, posts, settings.sqlalchemy_url


def test_serves_app_wakes_its_sender_when_a_worker_reports_an_end(served: tuple[Any, Posts, str]):
    client, posts, url = served
    other = Store(Database(url))  # a worker process's own store: no in-process hook
    task_id = finish(other)
    other.db.dispose()
    client.app.state.worker_reports.report(WORKER, ENDED, str(task_id))
    wait_for(lambda: posts.sent and posts.sent[0][1] == task_id, what="the callback")


def test_postgresqls_announcement_of_an_end_wakes_the_sender_of_another_process(postgres_url: str):
    api_db, worker_db = Database(postgres_url), Database(postgres_url)
    upgrade(api_db)
    api, worker = Store(api_db), Store(worker_db)
    listener = Listener(api_db, (EVENTS,), name="api listener").start()
    assert listener.wait_listening(10)
    posts = Posts([200])
    callbacks = sender(api, posts, listener)  # subscribed once listening: no look for the connection's own news
    try:
        wait_for(lambda: callbacks.looks >= 1, what="the sender's first look")
        looks = callbacks.looks
        task_id = finish(worker)
        wait_for(lambda: posts.sent == [(HOOK, task_id)], what="the callback")
        assert callbacks.looks - looks <= 4, "a few statuses announced, looks batched: no polling"
    finally:
        callbacks.stop()
        listener.close()
        api_db.dispose()
        worker_db.dispose()


def test_on_sqlite_a_task_ended_by_a_worker_that_tells_no_one_is_called_back_by_the_commit_counter(
        sqlite_store: Store):
    """A `particalize worker` that `serve` did not start has no pipe: its commit moves SQLite's counter."""
    posts = Posts([200])
    callbacks = sender(sqlite_store, posts, commits=SqliteCommits(sqlite_store.db.sqlite_file))
    other = Store(Database(sqlite_store.db.url))  # another process's store: no hook into this sender
    try:
        wait_for(lambda: callbacks.looks >= 1, what="the first look")
        time.sleep(0.6)
        assert callbacks.looks == 1, "nothing committed: no look"
        task_id = finish(other)
        wait_for(lambda: posts.sent == [(HOOK, task_id)], what="the callback")
        wait_for(lambda: sqlite_store.reads.get(task_id).callback_state == "delivered", what="it to be recorded")
        # the delivery's own commit brings one more look, which commits nothing: then the looks stop (no polling)
        deadline, before = time.monotonic() + 10, callbacks.looks
        while True:
            time.sleep(0.6)
            if callbacks.looks == before:
                break
            assert time.monotonic() < deadline, "still looking 10 s after the last commit"
            before = callbacks.looks
    finally:
        callbacks.stop()
        other.db.dispose()


def test_serves_app_on_sqlite_calls_back_a_task_ended_by_another_process_without_a_report(
        served: tuple[Any, Posts, str]):
    _client, posts, url = served
    other = Store(Database(url))  # a `particalize worker` of its own: no pipe, no hook
    task_id = finish(other)
    other.db.dispose()
    wait_for(lambda: posts.sent and posts.sent[0][1] == task_id, what="the callback")


def test_sqlites_commit_counter_moves_for_changes_committed_elsewhere_only(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'tasks.db'}")
    upgrade(db)
    commits = SqliteCommits(db.sqlite_file)
    try:
        assert commits.changed() is False, "the first ask only takes the count"
        store = Store(db)
        task = create_task(store, parameters={"numFrames": "5"}, image_url="https://images.example/a.png")
        assert commits.changed() is True
        assert commits.changed() is False, "counted once"
        assert store.callbacks.claim_due() == [], "a write transaction that changes nothing"
        assert commits.changed() is False
        store.tasks.cancel_if_queued(task.id)
        assert commits.changed() is True
    finally:
        commits.close()
        db.dispose()
    unreadable = SqliteCommits(tmp_path / "gone.db")
    assert unreadable.changed() is True, "cannot tell: say look"
    assert not (tmp_path / "gone.db").exists(), "a missing database is not created"
