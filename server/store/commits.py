"""Whether any connection committed a change to a SQLite database since the last ask: SQLite's own counter
(`PRAGMA data_version`), read on a connection of its own.

SQLite cannot notify, so a process that must react to another process's writes on one machine (the callback sender
of an API beside a `particalize worker` that `serve` did not start) would otherwise poll with a query, here a write
transaction. Reading the counter takes microseconds, touches no table and takes no lock a writer waits for; the
query runs only when the counter moved. A commit that changed nothing (an empty write transaction) leaves it alone.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path


class SqliteCommits:
    """`changed()`: True when a commit from any other connection changed the file since the previous call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._seen: int | None = None
        self._lock = threading.Lock()

    def changed(self) -> bool:
        """The first call only takes the count (False). Unreadable (the file gone, a disk error): True, so the
        caller looks as it would have without this; the connection is opened again on the next call."""
        with self._lock:
            try:
                if self._conn is None:  # mode=rw: a missing file is an error here, never a new empty database
                    self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=rw", uri=True, timeout=1.0,
                                                 isolation_level=None, check_same_thread=False)
                version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error:
                self._close()
                self._seen = None
                return True
            seen, self._seen = self._seen, version
            return seen is not None and version != seen

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
