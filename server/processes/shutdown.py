"""Graceful stop of a worker: stop claiming at once, let the running task finish within a grace period,
then interrupt it (it goes back to the queue) and exit. A task past its last denoising step is not
interrupted: it is decoded, stored and recorded within its finishing time (shutdown_finish_seconds) more.

`StopRequest` is the event the worker loop watches; `stop_on_signals` wires SIGTERM and SIGINT to it. The
first signal starts the grace period, a second one ends it (an operator who insists).
"""

from __future__ import annotations

import logging
import math
import queue
import signal
import threading
import time

log = logging.getLogger("particalize.worker")


class StopRequest(threading.Event):
    """Set: the worker claims nothing more. Its running task may go on until `deadline` (time.monotonic);
    past it, the task is interrupted at its next step and requeued. A plain `threading.Event` given to a
    worker instead means "stop now" (no grace)."""

    def __init__(self, grace_seconds: float) -> None:
        super().__init__()
        self.grace_seconds = max(0.0, grace_seconds)
        self.deadline = math.inf
        self._lock = threading.Lock()

    def request(self) -> bool:
        """The first call starts the grace period; any later one ends it now. True on the first call."""
        with self._lock:
            first = not self.is_set()
            now = time.monotonic()
            self.deadline = now + self.grace_seconds if first else min(self.deadline, now)
            self.set()
            return first

    def overdue(self) -> bool:
        return self.is_set() and time.monotonic() >= self.deadline


def stop_due(stop: threading.Event) -> bool:
    """Whether a running task must be interrupted now."""
    return stop.overdue() if isinstance(stop, StopRequest) else stop.is_set()


def finish_overdue(stop: threading.Event, finish_seconds: float) -> bool:
    """Whether a task whose video is already made must be given up now: `finish_seconds` after the grace
    period (the bound on decoding, storing and recording it; a plain Event: at once)."""
    if isinstance(stop, StopRequest):
        return stop.is_set() and time.monotonic() >= stop.deadline + finish_seconds
    return stop.is_set()


def stop_on_signals(stop: StopRequest, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """SIGTERM/SIGINT request the stop. The handler only puts the signal in a SimpleQueue (whose put is
    reentrant, so safe in a signal handler); a thread takes it from there and may take locks."""
    received: queue.SimpleQueue[int] = queue.SimpleQueue()

    def forward() -> None:
        while True:
            signum = received.get()
            name = signal.Signals(signum).name
            if stop.request():
                log.info("%s: claiming no more tasks; a running task may finish within %.0fs, then it is put "
                         "back in the queue (send it again to stop sooner)", name, stop.grace_seconds)
            else:
                log.info("%s again: the running task is interrupted now and put back in the queue", name)

    threading.Thread(target=forward, name="stop-signals", daemon=True).start()
    for signum in signals:
        signal.signal(signum, lambda signum, _frame: received.put(signum))
