"""Engine and transactions for SQLite (WAL, the default) and PostgreSQL (given a URL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

SQLITE_BUSY_TIMEOUT_MS = 15_000
CONNECT_TIMEOUT_SECONDS = 5


def normalize_url(url: str) -> str:
    """postgres:// and postgresql:// mean psycopg 3 here (psycopg2 is not a dependency)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


class Database:
    """One engine per process. `session(write=True)` is a write transaction: on SQLite it takes the
    write lock up front (BEGIN IMMEDIATE), so read-then-write sequences never fail half way with
    SQLITE_BUSY and two processes can never both act on what they read.

    `listen_url` (PostgreSQL only): where the connections that LISTEN for notifications go (server/store/notify.py),
    when that is not `url`: behind PgBouncer in transaction mode a LISTEN hears nothing, so the listening
    connections need a direct URL to the same database (`PARTICALIZE_DATABASE_LISTEN_URL`)."""

    def __init__(self, url: str, listen_url: str | None = None) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.is_postgres = parsed.get_backend_name() == "postgresql"
        self._write_lock = threading.Lock()
        self.sqlite_file: Path | None = None
        """The SQLite database's file (None for PostgreSQL or an in-memory database)."""
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                self.sqlite_file = Path(parsed.database)
                self.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            # More connections than this process has threads that use them (the 40 of the API's thread pool, the
            # callback sender's 8, the event loop's Task/Detail reads): a checkout never waits, which matters
            # most for the event loop. An idle SQLite connection is a file handle.
            self.engine: Engine = create_engine(self.url, pool_size=8, max_overflow=64, pool_timeout=30)
            _sqlite_setup(self.engine)
        else:
            # pre-ping: a connection the server dropped (a restart, a failover) is replaced before use, so
            # recovery needs no restart; a bounded connect: a host that is gone fails fast (a 503), never hangs.
            connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
            self.engine = create_engine(self.url, pool_size=8, max_overflow=32, pool_pre_ping=True,
                                        connect_args=connect_args)
        self.listen_url = normalize_url(listen_url) if listen_url else self.url
        self._listen_engine: Engine | None = None
        if self.listen_url != self.url:
            if not (self.is_postgres and make_url(self.listen_url).get_backend_name() == "postgresql"):
                raise ValueError("a separate listening URL (PARTICALIZE_DATABASE_LISTEN_URL) needs PostgreSQL for "
                                 "both it and the database URL: notifications are PostgreSQL's")
            listen = make_url(self.listen_url)
            connect_args = {} if "connect_timeout" in listen.query else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
            # No pool: a listening connection is taken once and kept (detached) until it breaks.
            self._listen_engine = create_engine(self.listen_url, poolclass=NullPool, connect_args=connect_args)

    @property
    def listen_engine(self) -> Engine:
        """The engine the listening connections come from: the main one unless a listening URL was given."""
        return self._listen_engine if self._listen_engine is not None else self.engine

    @contextmanager
    def connect(self, write: bool = False) -> Iterator[Connection]:
        """A connection inside one transaction, committed at the end (rolled back on an exception)."""
        with self._writer_turn(write), self.engine.connect() as conn:
            conn.execution_options(particalize_write=write)
            with conn.begin():
                yield conn

    @contextmanager
    def _writer_turn(self, write: bool) -> Iterator[None]:
        """On SQLite, this process's write transactions take turns on a lock before asking SQLite for its
        write lock: waiting threads are woken as soon as it is free, instead of sleeping in SQLite's busy
        handler (1, 2, 5 ... 100 ms) and losing the race again, which made a long tail under load."""
        if not (write and self.is_sqlite):
            yield
            return
        with self._write_lock:
            yield

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        with self.connect(write) as conn, Session(bind=conn, expire_on_commit=False) as session:
            yield session
            session.flush()

    def dispose(self) -> None:
        self.engine.dispose()
        if self._listen_engine is not None:
            self._listen_engine.dispose()


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # The driver must not open transactions on its own: "begin" below does, with the right mode.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("particalize_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
