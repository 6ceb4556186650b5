"""Prebuilt SELECTs run straight on a pooled DBAPI connection: Task/Detail's read without SQLAlchemy's Connection,
transaction-event and Result layers.

Task/Detail is the hottest path of the API (clients poll it). Through a SQLAlchemy Connection its two prebuilt
Core statements cost ~200 µs of CPU on the 2-core test machine (pool checkout, the `begin` event's BEGIN, two
executions, commit, result rows); the same statements on the pool's DBAPI connection cost ~25 µs. What SQLAlchemy
adds that matters is kept: the SQL is compiled once by the dialect (paramstyle and quoting), the pool is the engine's
own (its connect-time setup, pre-ping and reset on return), each value goes through its column type's own result
processor (JSON parsed, SQLite's 0/1 made a bool), and a driver error is raised as SQLAlchemy's exception class for
it (`DBAPIError.instance`), so a store outage is still told from a bug (server/store/outage.py) and answered 503.
A connection the driver reports as disconnected is invalidated, as SQLAlchemy does.
"""

from __future__ import annotations

import threading
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from sqlalchemy import Select
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import DBAPIError

Processor = Callable[[Any], Any]


class RawSelect:
    """One SELECT compiled for `dialect`; `rows(cursor, params)` runs it and answers named tuples whose fields are
    the selected columns' keys."""

    def __init__(self, name: str, stmt: Select, dialect: Dialect) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        self._positional = tuple(compiled.positiontup or ()) if dialect.positional else None
        for key, bind in compiled.binds.items():
            # Parameters are passed to the driver as given: each must be a plain bindparam(name) whose type has
            # no bind processing (ints and strings here), so nothing SQLAlchemy would do to them is skipped.
            if key != bind.key or bind.value is not None or bind.callable is not None:
                raise ValueError(f"{name}: parameter {key} must be a bindparam given at execution")
            if bind.type.dialect_impl(dialect).bind_processor(dialect) is not None:
                raise ValueError(f"{name}: parameter {key} needs SQLAlchemy's bind processing")
        self.keys = frozenset(compiled.binds)
        self._dialect = dialect
        self._columns = list(stmt.selected_columns)
        self.row_type = namedtuple(name, [column.key for column in self._columns])  # type: ignore[misc]
        self._processors: list[tuple[int, Processor]] | None = None
        self._lock = threading.Lock()

    def rows(self, cursor: Any, params: Mapping[str, Any]) -> list[Any]:
        bound = tuple(params[key] for key in self._positional) if self._positional is not None else params
        cursor.execute(self.sql, bound)
        fetched = cursor.fetchall()
        processors = self._processors if self._processors is not None else self._processors_for(cursor)
        make = self.row_type._make
        if not processors:
            return [make(row) for row in fetched]
        out = []
        for row in fetched:
            values = list(row)
            for index, process in processors:
                values[index] = process(values[index])
            out.append(make(values))
        return out

    def _processors_for(self, cursor: Any) -> list[tuple[int, Processor]]:
        """Each column type's result processor for the types the driver reports (PostgreSQL's numeric types
        depend on them), found once."""
        with self._lock:
            if self._processors is None:
                found = []
                for index, (column, described) in enumerate(zip(self._columns, cursor.description, strict=True)):
                    process = column.type.dialect_impl(self._dialect).result_processor(self._dialect, described[1])
                    if process is not None:
                        found.append((index, process))
                self._processors = found
            return self._processors


@contextmanager
def raw_read(engine: Engine, begin_sql: str | None) -> Iterator[Any]:
    """A cursor on a pooled DBAPI connection inside one read transaction (`begin_sql` opens it where the driver
    does not: SQLite here runs in autocommit); the connection goes back to the pool after, its transaction ended.
    Driver errors come out as SQLAlchemy's exceptions."""
    dialect = engine.dialect
    dbapi_error = dialect.loaded_dbapi.Error
    try:
        conn = engine.raw_connection()
    except dbapi_error as exc:  # connecting failed (the pool's pre-ping reconnects by itself, this did not)
        disconnected = dialect.is_disconnect(exc, None, None)
        raise DBAPIError.instance(None, None, exc, dbapi_error, connection_invalidated=disconnected,
                                  dialect=dialect) from exc
    cursor = None
    try:
        cursor = conn.cursor()
        if begin_sql:
            cursor.execute(begin_sql)
        yield cursor
        conn.rollback()  # a read: nothing to keep
    except dbapi_error as exc:
        disconnected = dialect.is_disconnect(exc, conn.dbapi_connection, cursor)
        if disconnected:
            conn.invalidate(exc)
        raise DBAPIError.instance(None, None, exc, dbapi_error, connection_invalidated=disconnected,
                                  dialect=dialect) from exc
    finally:
        if cursor is not None:
            with suppress(dbapi_error):
                cursor.close()
        conn.close()
