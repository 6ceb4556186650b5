"""The `serve` side of waking its own workers on SQLite (which cannot notify): one pipe to each worker process, a
line written to all of them when a Run queues a task or a Kill ends one. The worker side reads it
(server/wakeup.py: PipeWakeup)."""

from __future__ import annotations

import contextlib
import os
import threading

WAKE_FD_ENV = "_PARTICALIZE_WAKE_FD"
"""The pipe (a file descriptor number) a `serve` process's worker reads its wake-ups from, one line each."""


class WakePipes:
    """The `serve` side: one pipe to each worker process it starts; `send` writes a line to all of them without
    ever blocking (a worker that does not read, or is gone, misses it: its safety poll covers that)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}

    def open(self, slot: int) -> int:
        """A new pipe for worker `slot` (replacing its previous one); the read end, for the child to inherit."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        with self._lock:
            old = self._fds.pop(slot, None)
            self._fds[slot] = write_fd
        if old is not None:
            with contextlib.suppress(OSError):
                os.close(old)
        return read_fd

    def close(self, slot: int) -> None:
        with self._lock:
            fd = self._fds.pop(slot, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def send(self, task_id: int, status: str) -> None:
        line = f"{status} {task_id}\n".encode()
        with self._lock:  # held while writing: a pipe closed meanwhile must not have its number reused under us
            for fd in self._fds.values():
                with contextlib.suppress(OSError):  # full (BlockingIOError), or the reader gone (BrokenPipeError)
                    os.write(fd, line)
