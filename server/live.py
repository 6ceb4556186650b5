"""Following one task live, for the WebSocket and Server-Sent Events.

Workers are separate processes (possibly on other machines) and the database is the only channel, so a
follower gets its task's events from the store, through the process's one `EventFeed` (server/live_feed.py):
woken by PostgreSQL's notifications, one read for all followers (SQLite: one read every 0.25 s for all of them).
It first replays what is recorded (a late client gets the current state), then follows, and stops after a terminal
status. At most `MAX_FOLLOWERS` run per process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from server.live_feed import EventFeed, Subscription
from server.progress import SocketMessages
from server.services import Services
from server.store.models import POSTPROCESS_END, TERMINAL, Task, TaskEvent
from server.store.outage import is_outage

IDLE_TICK_SECONDS = 15.0
"""A follower that has sent nothing for this long yields None (SSE sends a keep-alive comment)."""
RETRY_SECONDS = 0.25
"""The store could not render an event (its outputs, at the end): tried again this much later."""
MAX_FOLLOWERS = 2048
"""Followers cost a connection and a subscription each, not queries (server/live_feed.py)."""


class TooManyFollowers(Exception):
    pass


@dataclass(frozen=True)
class LiveEvent:
    event_id: int
    message: dict[str, Any]
    terminal: bool


class _Slots:
    """Live connections of this process (all on one event loop, so a plain counter is safe)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def full(self) -> bool:
        return self.used >= self.limit

    @property
    def refusal(self) -> str:
        return (f"This server follows at most {self.limit} tasks live at once; poll /v1/Task/Detail instead, "
                "or try again later.")

    def take(self, *, check: bool = True) -> None:
        """Count one more connection; TooManyFollowers when none is free (unless told not to check)."""
        if check and self.full:
            raise TooManyFollowers(self.refusal)
        self.used += 1

    def give(self) -> None:
        self.used -= 1


SLOTS = _Slots(MAX_FOLLOWERS)


def find_by_token(services: Services, token: str) -> Task | None:
    """The task a socket access token names. The 30-character random token is the capability (as on
    Wiro's socket): no API key is asked for."""
    if not token or len(token) > 64:
        return None
    return services.store.reads.find(token=token)


class TaskFollower:
    def __init__(self, services: Services, task: Task, feed: EventFeed, *, after_id: int = 0) -> None:
        self.services = services
        self.task = task
        self.feed = feed
        self.after_id = after_id
        self._messages = SocketMessages(task.id, task.socketaccesstoken)
        self.finished = False

    def _outputs(self) -> tuple[str, list[dict[str, Any]]]:
        task = self.services.store.reads.get(self.task.id) or self.task
        (view,) = self.services.views([task])
        return task.pexit, view["outputs"]

    def render(self, events: list[TaskEvent]) -> tuple[list[LiveEvent], list[TaskEvent]]:
        """Events as messages, and those left unrendered (the store could not read the outputs now: they are
        rendered again later). Events up to `after_id` only update the translation state (an SSE client resuming
        with Last-Event-ID gets nothing twice)."""
        found: list[LiveEvent] = []
        for index, event in enumerate(events):
            try:
                message = self._messages.message(event, self._outputs)
            except SQLAlchemyError as exc:
                if not is_outage(exc):
                    raise
                return found, events[index:]
            if event.id > self.after_id:
                found.append(LiveEvent(event.id, message, event.status in TERMINAL))
            if event.status in TERMINAL:
                self.finished = True
                break
        return found, []

    async def events(self, stop: asyncio.Event | None = None) -> AsyncIterator[LiveEvent | None]:
        """Every event from the first (or after `after_id`) to the terminal one; None after each idle
        `IDLE_TICK_SECONDS`. Ends early when `stop` is set (the client went away)."""
        stop = stop or asyncio.Event()
        sub = self.feed.subscribe(self.task.id)
        relay = asyncio.create_task(_wake_on(stop, sub))
        try:
            while not stop.is_set():
                events = sub.take()
                if events:
                    # The end's outputs come from the store: off the event loop. Progress is rendered in place.
                    ending = any(e.status == POSTPROCESS_END for e in events)
                    batch, left = await run_in_threadpool(self.render, events) if ending else self.render(events)
                    for item in batch:
                        yield item
                    if self.finished:
                        return
                    if left:
                        sub.put_back(left)
                        await asyncio.sleep(RETRY_SECONDS)
                        continue
                try:
                    await asyncio.wait_for(sub.wake.wait(), timeout=IDLE_TICK_SECONDS)
                except asyncio.TimeoutError:
                    yield None
        finally:
            self.feed.unsubscribe(sub)
            relay.cancel()


async def _wake_on(stop: asyncio.Event, sub: Subscription) -> None:
    """The follower waits on its subscription only: wake it when the client goes away too."""
    await stop.wait()
    sub.wake.set()
