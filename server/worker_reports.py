"""What the workers a `serve` process runs say about themselves, outside the task store.

A worker records its state in the store; when the store cannot be written (SQLite on a full disk) that record goes
stale, and /ready would call a worker ready that claims nothing. So a worker also tells its parent, over a pipe
(server/processes/supervisor.py), when it pauses and when it goes on; /ready takes the worker's own word over the
store's.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("particalize.supervisor")

Report = Callable[[str, str], None]
"""A worker's report: (state, detail), e.g. ("paused", "Not enough free disk space ...") or ("ready", ""); or the
end of a task it committed, (ENDED, "<task id>"), which is no state of the worker."""

ENDED = "ended"

REPORT_FD_ENV = "_PARTICALIZE_REPORT_FD"
"""The pipe (a file descriptor number) a child worker writes its reports to, one JSON line each."""


class WorkerReports:
    """The latest word of each worker of this process that says it is paused (worker id -> why)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paused: dict[str, str] = {}
        self.ended: list[Callable[[int], None]] = []
        """Told the id of each task a worker reports it has ended (the callback sender looks for due callbacks)."""

    def report(self, worker_id: str, state: str, detail: str = "") -> None:
        if state == ENDED:
            if detail.isdigit():
                for listener in list(self.ended):
                    try:
                        listener(int(detail))
                    except Exception:
                        log.exception("could not pass on the end of task %s", detail)
            return
        with self._lock:
            if state == "paused":
                self._paused[worker_id] = detail
            else:
                self._paused.pop(worker_id, None)

    def forget(self, worker_id: str) -> None:
        """Its process has ended: its word no longer holds (the store's heartbeat tells from now on)."""
        self.report(worker_id, "gone")

    def paused(self) -> dict[str, str]:
        with self._lock:
            return dict(self._paused)

    def read_pipe(self, fd: int) -> None:
        """Take the reports written to `fd` until its writer ends (a worker process exiting), then forget that
        worker. A line that is not a report is skipped: a worker's bad line must not stop the others'."""
        seen: set[str] = set()
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                try:
                    message = json.loads(line)
                    worker_id, state, detail = message["worker"], message["state"], message.get("detail", "")
                except (ValueError, KeyError, TypeError):
                    log.warning("ignored a malformed worker report: %r", line[:200])
                    continue
                seen.add(worker_id)
                self.report(str(worker_id), str(state), str(detail))
        for worker_id in seen:
            self.forget(worker_id)


def pipe_reporter(fd: int, worker_id: str) -> Report:
    """The child's side: each report one JSON line on `fd` (short enough to be written at once). A parent that is
    gone is no reason to fail: the report is dropped."""
    stream = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
    lock = threading.Lock()

    def report(state: str, detail: str) -> None:
        line = json.dumps({"worker": worker_id, "state": state, "detail": detail[:2000]}) + "\n"
        with lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass

    return report


def reporter_from_env(worker_id: str) -> Report | None:
    """The report pipe `serve` gave this worker process (taken out of the environment), or None."""
    fd = os.environ.pop(REPORT_FD_ENV, None)
    if not fd or not fd.isdigit():
        return None
    try:
        return pipe_reporter(int(fd), worker_id)
    except OSError:
        return None
