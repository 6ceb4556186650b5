"""The live feed (server/live_feed.py) that every live follower of an API process shares: each follower gets each of
its task's events exactly once and in order, the replay of many followers is one read of the store (not one per
follower), a follower that joins late gets the history first; on PostgreSQL a new status reaches the followers
through its notification (the reads of all followed tasks are a minute apart here)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from server.live_feed import EventFeed, Subscription
from server.store import Database, Store, upgrade
from server.store.models import TERMINAL
from server.store.notify import EVENTS, Listener
from tests.tasks import create_task

SMALL = {"numFrames": "5", "width": "32", "height": "32", "seed": "4", "steps": "3"}
WORKER = "testnode/gpu0"
NEVER = 60.0


@pytest.fixture
def feed_store(db_url: str) -> Iterator[Store]:
    db = Database(db_url)
    upgrade(db)
    yield Store(db)
    db.dispose()


def make_feed(store: Store) -> EventFeed:
    """Woken by notifications on PostgreSQL (reading all a minute apart; a generating task every 50 ms, as its
    progress is not announced); reading all every 50 ms on SQLite."""
    if store.db.is_postgres:
        listener = Listener(store.db, (EVENTS,)).start()
        assert listener.wait_listening(10)
        return EventFeed(store, listener, poll_seconds=0.05, safety_seconds=NEVER, batch_seconds=0.01)
    return EventFeed(store, None, poll_seconds=0.05, batch_seconds=0.01)


async def collect(sub: Subscription, until: int) -> list[int]:
    """Event ids handed to `sub` until it has `until` of them."""
    got: list[int] = []
    while len(got) < until:
        await asyncio.wait_for(sub.wake.wait(), 20)
        got += [e.id for e in sub.take()]
    return got


def run_task(store: Store, task_id: int) -> None:
    """A worker's writes: claim (unless done already), a progress step per denoising step, the end."""
    if store.reads.get(task_id).status == "task_queue":
        claimed = store.tasks.claim_next(WORKER)
        assert claimed is not None and claimed.id == task_id
    for step in range(1, 4):
        store.tasks.progress(task_id, WORKER, step, 3, 0.1 * step)
    store.tasks.fail(task_id, "the test ends it", WORKER)


def test_every_follower_gets_each_event_once_in_order_and_the_replay_is_one_read(feed_store: Store):
    tasks = [create_task(feed_store, parameters=SMALL, image_url="https://images.example/a.png") for _ in range(3)]

    async def scenario() -> None:
        feed = make_feed(feed_store)
        try:
            subs = [feed.subscribe(tasks[i % 3].id) for i in range(30)]  # all before the reader runs
            replays = await asyncio.gather(*(collect(sub, 1) for sub in subs))
            # one read (two if the listener's "you may have missed something" lands meanwhile), not one per follower
            assert feed.reads <= 2, f"30 followers of 3 tasks replayed from {feed.reads} reads"
            assert all(len(r) == 1 for r in replays), "each has its task's one event (task_queue)"
            assert feed_store.tasks.claim_next(WORKER).id == tasks[0].id  # queued: not read until told (PostgreSQL)
            accepted = await asyncio.gather(*(collect(sub, 1) for sub in subs[::3]))
            assert [a[0] for a in accepted] == [feed_store.reads.events(tasks[0].id)[1].id] * 10
            replays[::3] = [r + a for r, a in zip(replays[::3], accepted, strict=True)]
            for task in tasks:  # one after the other, as one worker takes them
                await asyncio.to_thread(run_task, feed_store, task.id)
            ends = await asyncio.gather(*(collect(sub, 4 if i % 3 == 0 else 5) for i, sub in enumerate(subs)))
            for index, sub in enumerate(subs):
                expected = [e.id for e in feed_store.reads.events(sub.task_id)]
                assert replays[index] + ends[index] == expected, f"follower {index}: exactly once, in order"
                assert sub.pending == []
            late = feed.subscribe(tasks[0].id)
            assert await collect(late, 6) == [e.id for e in feed_store.reads.events(tasks[0].id)], "the history"
            assert feed_store.reads.get(tasks[0].id).status in TERMINAL
        finally:
            await feed.close()

    asyncio.run(scenario())
