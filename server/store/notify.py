"""PostgreSQL LISTEN/NOTIFY: the database tells a process when a task is queued, cancelled, or has a new status,
instead of the process asking it every few milliseconds.

The notifications are sent by a trigger on task_events (migration 0006), in the transaction that writes the event,
and delivered at its commit: a woken process always finds what it was told about. They are hints, never the record:
whoever is woken reads the store, as it did when it polled, so nothing at-least-once or forward-only depends on
them. A notification can be lost (the listening connection dropped, the process busy), so every user keeps a slow
safety poll, and after the connection is (re-)established every subscriber is told "anything may have happened"
(its callback gets None).

One `Listener` per process and purpose holds one connection of its own (taken from the engine's pool and detached
from it, so it has the same URL and connect arguments; or, given `PARTICALIZE_DATABASE_LISTEN_URL`, made from that
URL, e.g. straight to PostgreSQL when the pools go through PgBouncer in transaction mode, which does not carry
LISTEN), LISTENs on its channels and calls the subscribers from its thread. While the database is unreachable it
reconnects with a growing wait, logging one line when it loses the connection and one when it listens again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from server.store.db import Database
from server.store.outage import describe

log = logging.getLogger("particalize.notify")

EVENTS = "particalize_events"
"""A task's new status (any event but a denoising step's progress); payload the task id (API replicas push it to
their live followers)."""
QUEUE = "particalize_queue"
"""A task was queued or requeued; payload the task id (idle workers claim)."""
CANCEL = "particalize_cancel"
"""A task was cancelled or killed; payload the task id (its worker stops the run)."""

Callback = Callable[[str | None], None]


class WrongDatabase(Exception):
    """The listening URL leads to another database than the task store's (tried again like an outage, logged once)."""

"""Called with a notification's payload, or with None when notifications may have been missed."""


class Listener:
    """A thread listening on `channels` (names above) of `db`'s schema, calling each channel's subscribers."""

    def __init__(self, db: Database, channels: Iterable[str], *, name: str = "listener",
                 idle_ping_seconds: float = 30.0, max_wait_seconds: float = 5.0) -> None:
        if not db.is_postgres:
            raise ValueError("LISTEN/NOTIFY needs PostgreSQL")
        self.db = db
        self.channels = tuple(channels)
        self.name = name
        self.idle_ping_seconds = idle_ping_seconds
        """A connection silent this long is checked (a SELECT 1): a half-open one is found and replaced."""
        self.max_wait_seconds = max_wait_seconds
        self._subscribers: dict[str, list[Callback]] = {channel: [] for channel in self.channels}
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._down_since: float | None = None
        self.connections = 0
        """Connections made so far (a reconnect after an outage makes one more)."""
        self.backend_pid: int | None = None
        """The server process of the listening connection (for an operator matching it in pg_stat_activity)."""

    @property
    def listening(self) -> bool:
        """Connected and listening now: notifications arrive (else the users poll as they did without them)."""
        return self._listening.is_set()

    def wait_listening(self, timeout: float) -> bool:
        return self._listening.wait(timeout)

    def subscribe(self, channel: str, callback: Callback) -> None:
        """`callback(payload)` for each notification on `channel` (from the listener's thread: keep it short),
        `callback(None)` after each (re)connection."""
        self._subscribers[channel].append(callback)

    def start(self) -> Listener:
        self._thread.start()
        return self

    def close(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        wait = 0.25
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except Exception as exc:  # an unreachable database: wait and try again (logged once per outage)
                self._lost(exc)
                self._stop.wait(wait)
                wait = min(self.max_wait_seconds, wait * 2)
                continue
            wait = 0.25
            try:
                self._back()
                self._dispatch_all(None)  # what was sent while no connection listened is lost: say so
                self._listen(conn)
            except Exception as exc:
                if not self._stop.is_set():
                    self._lost(exc)
            finally:
                self._listening.clear()
                with contextlib.suppress(Exception):  # a broken connection may fail to close: it is gone anyway
                    conn.close()

    def _connect(self) -> Any:
        """A connection of its own, in autocommit, listening on this schema's channels: from the database's listening
        engine (the main engine, so the same URL, connect arguments and events, unless a listening URL was given),
        detached from any pool. The schema (the channels' names) is the task store's, asked of the main engine; a
        connection that reaches another database than the store's would hear nothing and is refused."""
        from psycopg import sql

        with self.db.engine.connect() as store_conn:
            schema, database = store_conn.exec_driver_sql("SELECT current_schema(), current_database()").one()
        raw = self.db.listen_engine.raw_connection()
        conn = raw.driver_connection
        raw.detach()  # ours alone from now on: closed by us, never handed back to the pool
        try:
            conn.rollback()
            conn.autocommit = True
            listened = conn.execute("SELECT current_database()").fetchone()[0]
            if listened != database:
                raise WrongDatabase(f"the listening URL reaches database {listened!r}, the task store is in "
                                    f"{database!r}: notifications are per database (PARTICALIZE_DATABASE_LISTEN_URL)")
            self._channel_of = {f"{schema}.{channel}": channel for channel in self.channels}
            for full in self._channel_of:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(full)))
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self.connections += 1
        self.backend_pid = conn.info.backend_pid
        self._listening.set()
        return conn

    def _listen(self, conn: Any) -> None:
        silent_since = time.monotonic()
        while not self._stop.is_set():
            got = False
            for note in conn.notifies(timeout=1.0):
                got = True
                channel = self._channel_of.get(note.channel)
                if channel is not None:
                    self._dispatch(channel, note.payload)
                if self._stop.is_set():
                    return
            now = time.monotonic()
            if got:
                silent_since = now
            elif now - silent_since >= self.idle_ping_seconds:
                conn.execute("SELECT 1")  # raises on a connection that is gone without having said so
                silent_since = now

    def _dispatch(self, channel: str, payload: str | None) -> None:
        for callback in list(self._subscribers.get(channel, ())):
            try:
                callback(payload)
            except Exception:
                log.exception("a %s subscriber failed on a notification", channel)

    def _dispatch_all(self, payload: str | None) -> None:
        for channel in self.channels:
            self._dispatch(channel, payload)

    def _lost(self, exc: BaseException) -> None:
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        log.warning("%s: notifications from the task store stopped (%s); polling instead until they are back",
                    self.name, describe(exc))

    def _back(self) -> None:
        if self._down_since is None:
            return
        lasted, self._down_since = time.monotonic() - self._down_since, None
        log.warning("%s: notifications from the task store are back after %.1fs", self.name, lasted)
