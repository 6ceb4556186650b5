"""Following one task live, for the WebSocket and Server-Sent Events.

Workers are separate processes (possibly on other machines) and the database is the only channel, so a
follower polls the store: one indexed query for the task's events newer than the last one sent, every
`poll_seconds`, off the event loop. It first replays what is recorded (a late client gets the current
state), then follows, and stops after a terminal status. At most `MAX_FOLLOWERS` run per process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from server.progress import SocketMessages
from server.services import Services
from server.store.models import TERMINAL, Task
from server.store.outage import is_outage

POLL_SECONDS = 0.25
IDLE_TICK_SECONDS = 15.0
"""A follower that has sent nothing for this long yields None (SSE sends a keep-alive comment)."""
MAX_FOLLOWERS = 256


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
    def __init__(self, services: Services, task: Task, *, after_id: int = 0,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self.services = services
        self.task = task
        self.after_id = after_id
        self.poll_seconds = poll_seconds
        self._messages = SocketMessages(task.id, task.socketaccesstoken)
        self._seen = 0
        self.finished = False

    def _outputs(self) -> tuple[str, list[dict[str, Any]]]:
        task = self.services.store.reads.get(self.task.id) or self.task
        (view,) = self.services.views([task])
        return task.pexit, view["outputs"]

    def poll(self) -> list[LiveEvent]:
        """New events as messages (blocking: runs in a worker thread). Events up to `after_id` only update
        the translation state (an SSE client resuming with Last-Event-ID gets nothing twice)."""
        found: list[LiveEvent] = []
        try:  # a store outage is a pause in the stream (keep-alives go on), not its end
            events = self.services.store.reads.events(self.task.id, self._seen)
        except SQLAlchemyError as exc:
            if not is_outage(exc):
                raise
            return found
        for event in events:
            try:
                message = self._messages.message(event, self._outputs)
            except SQLAlchemyError as exc:
                if not is_outage(exc):
                    raise
                break  # this event is read again once the store answers
            self._seen = event.id
            if event.id > self.after_id:
                found.append(LiveEvent(event.id, message, event.status in TERMINAL))
            if event.status in TERMINAL:
                self.finished = True
                break
        return found

    async def events(self, stop: asyncio.Event | None = None) -> AsyncIterator[LiveEvent | None]:
        """Every event from the first (or after `after_id`) to the terminal one; None after each idle
        `IDLE_TICK_SECONDS`. Ends early when `stop` is set (the client went away)."""
        stop = stop or asyncio.Event()
        idle = 0.0
        while not stop.is_set():
            batch = await run_in_threadpool(self.poll)
            for item in batch:
                yield item
            if self.finished:
                return
            idle = 0.0 if batch else idle + self.poll_seconds
            if idle >= IDLE_TICK_SECONDS:
                idle = 0.0
                yield None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_seconds)
