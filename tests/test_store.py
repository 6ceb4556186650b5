"""The task store, on SQLite and PostgreSQL: lifecycle stamps, exclusive claims, cancel/kill rules,
orphaned tasks requeued once then failed, replay-proof nonces, callback bookkeeping, migrations."""

from __future__ import annotations

import string
import threading

import pytest
from sqlalchemy import inspect

from server.store import (
    Database,
    DbNonceStore,
    NewOutput,
    NewUpload,
    QueueFull,
    Store,
    StoreOptions,
    TaskKilled,
    TaskLost,
    new_id,
    upgrade,
)
from server.store.migrate import current_revision
from server.store.models import (
    ACCEPT,
    ASSIGN,
    CANCEL,
    END,
    LIFECYCLE,
    OUTPUT,
    OUTPUT_FULL,
    POSTPROCESS_END,
    POSTPROCESS_START,
    PREPROCESS_END,
    PREPROCESS_START,
    QUEUED,
    STAMPS,
    START,
    Base,
)
from server.task_record import record_of
from tests.tasks import create_task


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0  # every call is a second later, so stamps are distinct and ordered
        return self.now


@pytest.fixture
def db(db_url: str):
    database = Database(db_url)
    upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def store(db: Database) -> Store:
    return Store(db, StoreOptions(lease_seconds=60, requeue_limit=1, max_queue_length=50, callback_attempts=3,
                                  callback_backoff_seconds=10), clock=Clock())


def make_task(store: Store, **kw):
    values = dict(parameters={"prompt": "p", "numFrames": "9"}, image_url="https://example.com/a.png")
    values.update(kw)
    return create_task(store, **values)


def test_migrations_create_exactly_the_models_schema(db: Database):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from server.store.migrate import alembic_config

    assert current_revision(db) == ScriptDirectory.from_config(alembic_config()).get_current_head() == "0006"
    upgrade(db)  # idempotent
    with db.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        tables = set(inspect(conn).get_table_names())
    assert diffs == []
    assert {"tasks", "task_events", "outputs", "uploads", "nonces", "workers"} <= tables


def test_new_tasks_have_integer_ids_and_30_char_random_tokens(store: Store):
    a, b = make_task(store), make_task(store)
    assert b.id > a.id > 0
    for task in (a, b):
        assert len(task.socketaccesstoken) == 30
        assert set(task.socketaccesstoken) <= set(string.ascii_letters + string.digits)
        assert task.status == QUEUED and task.createtime > 0 and task.accepttime == 0
    assert a.socketaccesstoken != b.socketaccesstoken
    assert store.reads.find(str(a.id)).id == a.id
    assert store.reads.find(token=a.socketaccesstoken).id == a.id
    assert store.reads.find(str(a.id), b.socketaccesstoken) is None, "id and token of different tasks"
    assert store.reads.find("nope") is None and store.reads.find("999999") is None


def test_the_whole_lifecycle_stamps_each_time_in_order(store: Store):
    task = make_task(store)
    claimed = store.tasks.claim_next("w/gpu0")
    assert claimed.id == task.id and claimed.status == ACCEPT and claimed.attempts == 1
    for status in (PREPROCESS_START, PREPROCESS_END, ASSIGN, START, OUTPUT, OUTPUT, OUTPUT_FULL, END,
                   POSTPROCESS_START):
        assert store.tasks.advance(task.id, "w/gpu0", status, debugoutput=f"at {status}") is False
    done = store.tasks.complete(task.id, "w/gpu0", [NewOutput("0.mp4", "video/mp4", 123, f"{task.uuid}/0.mp4")],
                          totalcost=0.5, debugoutput="done")
    assert done.status == POSTPROCESS_END and done.pexit == "0" and done.totalcost == 0.5
    stamps = [getattr(done, STAMPS[s]) for s in LIFECYCLE if s in STAMPS]
    assert all(stamps) and stamps == sorted(stamps)
    assert done.createtime < done.accepttime and done.canceltime == 0
    events = [e.status for e in store.reads.events(task.id)]
    assert events == [QUEUED, ACCEPT, PREPROCESS_START, PREPROCESS_END, ASSIGN, START, OUTPUT, OUTPUT_FULL, END,
                      POSTPROCESS_START, POSTPROCESS_END]
    outputs = store.reads.outputs([task.id])[task.id]
    assert [(o.name, o.size, len(o.accesskey)) for o in outputs] == [("0.mp4", 123, 30)]


def test_oldest_queued_task_is_claimed_first(store: Store):
    ids = [make_task(store).id for _ in range(3)]
    assert [store.tasks.claim_next("w").id for _ in range(3)] == ids
    assert store.tasks.claim_next("w") is None


def test_concurrent_claimers_never_share_a_task(db_url: str, store: Store):
    ids = {make_task(store).id for _ in range(40)}
    claimed: dict[str, list[int]] = {}
    barrier = threading.Barrier(4)

    def claimer(name: str) -> None:
        own = Store(Database(db_url))  # its own engine and connections, like another process
        barrier.wait()
        got = claimed.setdefault(name, [])
        while (task := own.tasks.claim_next(name)) is not None:
            got.append(task.id)
        own.db.dispose()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [i for got in claimed.values() for i in got]
    assert sorted(everything) == sorted(ids), "every task claimed exactly once"
    assert store.reads.count(QUEUED) == 0


def test_cancel_only_while_queued(store: Store):
    queued, running = make_task(store), make_task(store)
    task, cancelled = store.tasks.cancel_if_queued(queued.id)
    assert cancelled and task.status == CANCEL and task.canceltime > 0 and task.endtime == task.canceltime
    assert store.tasks.claim_next("w").id == running.id
    task, cancelled = store.tasks.cancel_if_queued(running.id)
    assert not cancelled and task.status == ACCEPT
    assert store.tasks.cancel_if_queued(queued.id)[1] is False, "already cancelled"
    assert store.tasks.cancel_if_queued(424242) == (None, False)


def test_kill_only_while_running(store: Store):
    queued = make_task(store)
    outcome = store.tasks.request_kill(queued.id)
    assert not outcome.accepted and "queued" in outcome.reason
    store.tasks.claim_next("w")
    store.tasks.advance(queued.id, "w", START)
    outcome = store.tasks.request_kill(queued.id)
    assert outcome.accepted
    killed = store.reads.get(queued.id)
    assert outcome.task.status == killed.status == CANCEL, "task_cancel at once, as Task/Kill answers"
    assert killed.canceltime > 0 and killed.endtime == killed.canceltime and killed.totalcost == 0
    assert store.tasks.kill_requested(queued.id)
    with pytest.raises(TaskKilled):
        store.tasks.advance(queued.id, "w", OUTPUT)  # the worker learns of it at its next write
    with pytest.raises(TaskKilled):
        store.tasks.complete(queued.id, "w", [], totalcost=0, debugoutput="")
    ended = store.tasks.finish_killed(queued.id, "w", "killed at step 2")
    assert ended.status == CANCEL and ended.debugoutput == "killed at step 2" and ended.totalcost == 0
    assert store.reads.outputs([queued.id])[queued.id] == []
    outcome = store.tasks.request_kill(queued.id)
    assert not outcome.accepted and "ended" in outcome.reason


def test_another_worker_cannot_move_a_task_it_does_not_own(store: Store):
    task = make_task(store)
    store.tasks.claim_next("w1")
    with pytest.raises(TaskLost):
        store.tasks.advance(task.id, "w2", START)
    with pytest.raises(TaskLost):
        store.tasks.complete(task.id, "w2", [], totalcost=0, debugoutput="")


def test_orphaned_task_is_requeued_once_then_failed_with_the_reason(store: Store):
    task = make_task(store)
    store.tasks.claim_next("node/gpu0")
    store.tasks.advance(task.id, "node/gpu0", START)
    # the worker restarts under the same id: its previous life's task is an orphan
    recovered = store.tasks.recover_orphans(worker_id="node/gpu0")
    assert [(r.task_id, r.action) for r in recovered] == [(task.id, "requeued")]
    again = store.reads.get(task.id)
    assert again.status == QUEUED and again.attempts == 1 and again.worker_id is None
    assert again.createtime == task.createtime, "a requeued task keeps its creation time"
    assert again.accepttime == again.starttime == 0, "times of the lost attempt are cleared"
    assert "requeued" in again.debugoutput

    assert store.tasks.claim_next("node/gpu0").attempts == 2
    recovered = store.tasks.recover_orphans(worker_id="node/gpu0")
    assert [(r.task_id, r.action) for r in recovered] == [(task.id, "failed")]
    failed = store.reads.get(task.id)
    assert failed.status == POSTPROCESS_END and failed.pexit == "1" and failed.totalcost == 0
    assert "lost" in failed.debugerror and "not retried again" in failed.debugerror
    assert store.tasks.claim_next("node/gpu0") is None


def test_expired_lease_frees_a_task_held_by_a_dead_worker(store: Store):
    task = make_task(store)
    claimed = store.tasks.claim_next("other/gpu0")
    assert store.tasks.recover_orphans(now=claimed.accepttime + 30) == [], "lease still running"
    store.workers.heartbeat("other/gpu0", task.id)  # renews the lease
    assert store.tasks.recover_orphans(now=claimed.accepttime + 61) == []
    recovered = store.tasks.recover_orphans(now=claimed.accepttime + 1000)
    assert [r.action for r in recovered] == ["requeued"]


def test_a_killed_task_is_not_an_orphan_to_requeue(store: Store):
    task = make_task(store)
    store.tasks.claim_next("w")
    store.tasks.request_kill(task.id)
    assert store.tasks.recover_orphans(worker_id="w") == [], "it already ended in task_cancel"
    assert store.reads.get(task.id).status == CANCEL


def test_graceful_release_does_not_count_as_an_attempt(store: Store):
    task = make_task(store)
    store.tasks.claim_next("w")
    store.tasks.release(task.id, "w", "worker stopping")
    again = store.reads.get(task.id)
    assert again.status == QUEUED and again.attempts == 0


def test_failing_a_task_records_the_reason_without_cost(store: Store):
    task = make_task(store)
    store.tasks.claim_next("w")
    failed = store.tasks.fail(task.id, "Request parameter [inputImageUrl] could not be fetched", "w")
    assert (failed.status, failed.pexit, failed.totalcost) == (POSTPROCESS_END, "1", 0)
    assert store.tasks.fail(task.id, "again") is None, "a finished task is not failed twice"


def test_full_queue_refuses_new_tasks(db: Database):
    store = Store(db, StoreOptions(max_queue_length=2))
    make_task(store)
    make_task(store)
    with pytest.raises(QueueFull):
        make_task(store)
    store.tasks.claim_next("w")
    make_task(store)  # one left the queue


def test_tasks_of_another_api_key_are_not_found(store: Store):
    mine = make_task(store, owner="k1")
    make_task(store, owner="k2")
    assert store.reads.find(str(mine.id), owner="k2") is None
    assert store.reads.find(str(mine.id), owner="k1").id == mine.id
    assert store.reads.list(owner="k1")[0] == 1
    assert store.reads.list()[0] == 2


def test_list_is_newest_first_and_pages(store: Store):
    ids = [make_task(store).id for _ in range(5)]
    total, page = store.reads.list(start=1, limit=2)
    assert total == 5 and [t.id for t in page] == ids[::-1][1:3]


def test_upload_sent_with_a_run_belongs_to_the_task_and_goes_with_its_files(store: Store):
    upload = NewUpload(new_id(), "dog.png", "image/png", b"\x89PNG...")
    task = make_task(store, image_url="http://testserver/files/uploads/x/dog.png", new_upload=upload)
    assert record_of(task).image.upload_id == upload.id and store.uploads.get(upload.id).data == b"\x89PNG..."
    assert store.uploads.delete_task_files(task.id) == []
    assert store.uploads.get(upload.id) is None


def test_a_nonce_is_accepted_once_per_key_across_processes(db_url: str, db: Database):
    first, second = DbNonceStore(db), DbNonceStore(Database(db_url))  # two API replicas
    assert first.use("k", "1700000000", 1000.0, 300) is True
    assert second.use("k", "1700000000", 1001.0, 300) is False, "replayed on another replica"
    assert second.use("other", "1700000000", 1001.0, 300) is True, "per key"
    assert first.use("k", "1700000000", 1400.0, 300) is True, "outside the window"
    second.db.dispose()


def test_callback_is_due_at_the_end_and_retried_with_back_off(store: Store):
    task = make_task(store, callback_url="https://example.com/hook")
    plain = make_task(store)
    assert store.callbacks.claim_due() == [], "not terminal yet"
    store.tasks.cancel_if_queued(task.id)
    store.tasks.cancel_if_queued(plain.id)
    assert store.callbacks.claim_due() == [task.id]
    assert store.callbacks.claim_due() == [], "held while being sent"
    state, attempts, next_at = store.callbacks.record(task.id, delivered=False)
    assert (state, attempts) == ("pending", 1)
    later = store.reads.get(task.id)
    assert later.callback_next_at == next_at and next_at - store.clock.now >= 8  # back-off 10 s
    state, attempts, next_at = store.callbacks.record(task.id, delivered=False)
    assert next_at - store.clock.now >= 18, "doubles"
    assert store.callbacks.record(task.id, delivered=False)[:2] == ("failed", 3)
    other = make_task(store, callback_url="https://example.com/hook")
    store.tasks.cancel_if_queued(other.id)
    store.callbacks.claim_due()
    assert store.callbacks.record(other.id, delivered=True)[:2] == ("delivered", 1)


# --- the last phase: forward only, the first record wins ------------------------------------------------------

FORWARD = (PREPROCESS_START, PREPROCESS_END, ASSIGN, START, OUTPUT_FULL, END, POSTPROCESS_START)


def walk_to(store: Store, task_id: int, worker: str, last: str) -> None:
    for status in FORWARD[:FORWARD.index(last) + 1]:
        store.tasks.advance(task_id, worker, status)


def statuses(store: Store, task_id: int) -> list[str]:
    return [e.status for e in store.reads.events(task_id)]


def test_a_running_task_never_moves_back_when_a_step_is_repeated_or_late(store: Store):
    task = make_task(store)
    claimed = store.tasks.claim_next("w")
    walk_to(store, task.id, "w", POSTPROCESS_START)
    store.tasks.advance(task.id, "w", POSTPROCESS_START, claimed_attempt=claimed.attempts)  # a retry, answer lost
    store.tasks.advance(task.id, "w", OUTPUT_FULL, claimed_attempt=claimed.attempts)  # a late, repeated step
    store.tasks.progress(task.id, "w", 3, 3, 1.0)  # a late progress write
    assert store.reads.get(task.id).status == POSTPROCESS_START
    assert statuses(store, task.id) == [QUEUED, ACCEPT, *FORWARD], "each status once, in order"


def test_a_made_video_is_not_released_back_to_the_queue(store: Store):
    made, running = make_task(store), make_task(store)
    store.tasks.claim_next("w")
    store.tasks.claim_next("w")
    walk_to(store, made.id, "w", OUTPUT_FULL)
    walk_to(store, running.id, "w", START)
    assert store.tasks.release(made.id, "w", "worker stopping") is False
    kept = store.reads.get(made.id)
    assert (kept.status, kept.worker_id, kept.attempts) == (OUTPUT_FULL, "w", 1)
    assert store.tasks.release(running.id, "w", "worker stopping") is True
    assert store.reads.get(running.id).status == QUEUED
    assert store.tasks.release(running.id, "w", "again") is False, "no longer this worker's"


def test_a_complete_retried_after_its_answer_was_lost_is_the_same_one_record(store: Store):
    task = make_task(store)
    claimed = store.tasks.claim_next("w")
    walk_to(store, task.id, "w", POSTPROCESS_START)
    out = [NewOutput("0.mp4", "video/mp4", 10, f"{task.uuid}/0.mp4")]
    first = store.tasks.complete(task.id, "w", out, totalcost=1.0, debugoutput="done", claimed_attempt=claimed.attempts)
    again = store.tasks.complete(task.id, "w", out, totalcost=1.0, debugoutput="done", claimed_attempt=claimed.attempts)
    assert (again.status, again.pexit) == (first.status, "0") == (POSTPROCESS_END, "0")
    assert len(store.reads.outputs([task.id])[task.id]) == 1
    assert statuses(store, task.id).count(POSTPROCESS_END) == 1


def test_a_worker_behind_one_that_is_storing_its_video_cannot_take_the_task_back(store: Store):
    task = make_task(store)
    first = store.tasks.claim_next("a")  # a's lease runs out during an outage; b takes the requeued task up
    store.tasks.recover_orphans(now=first.lease_expires_at + 1)
    store.tasks.claim_next("b")
    walk_to(store, task.id, "b", POSTPROCESS_START)  # b has made its video too and is storing it
    mine = [NewOutput("0.mp4", "video/mp4", 10, f"{task.uuid}/0.mp4")]
    for status in (OUTPUT_FULL, END, POSTPROCESS_START):
        with pytest.raises(TaskLost):
            store.tasks.advance(task.id, "a", status, claimed_attempt=first.attempts)
    with pytest.raises(TaskLost):
        store.tasks.complete(task.id, "a", mine, totalcost=0.0, debugoutput="a", claimed_attempt=first.attempts)
    held = store.reads.get(task.id)
    assert (held.status, held.worker_id) == (POSTPROCESS_START, "b"), "not moved back, not taken from b"
    theirs = [NewOutput("0.mp4", "video/mp4", 20, f"{task.uuid}/0.mp4")]
    store.tasks.complete(task.id, "b", theirs, totalcost=0.0, debugoutput="b")
    (recorded,) = store.reads.outputs([task.id])[task.id]
    assert recorded.size == 20, "b's record, once"


def test_a_worker_ahead_of_another_takes_the_task_back_forward(store: Store):
    task = make_task(store)
    first = store.tasks.claim_next("a")
    store.tasks.recover_orphans(now=first.lease_expires_at + 1)
    store.tasks.claim_next("b")
    walk_to(store, task.id, "b", START)
    store.tasks.advance(task.id, "a", OUTPUT_FULL, claimed_attempt=first.attempts)
    taken = store.reads.get(task.id)
    assert (taken.status, taken.worker_id) == (OUTPUT_FULL, "a")
    with pytest.raises(TaskLost):
        store.tasks.progress(task.id, "b", 1, 3, 1.0)
    after = statuses(store, task.id)[statuses(store, task.id).index(QUEUED, 1):]
    assert after == [QUEUED, ACCEPT, PREPROCESS_START, PREPROCESS_END, ASSIGN, START, OUTPUT_FULL]
