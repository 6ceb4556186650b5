"""The workers `particalize serve` runs: child processes running `particalize worker --slot N`.

A child process keeps the model (and the GIL it holds while generating) away from the API's event
loop; the database is the channel between them. On SQLite, which cannot notify, the serve process also wakes its
workers itself (`wake`, over a pipe to each: server/wakeup.py) when a Run queues a task or a Kill ends one.
A child dies with the serve process (Linux PDEATHSIG, set by the child itself; it also checks its parent), is
stopped gracefully on shutdown (SIGTERM: it claims nothing more and finishes its running task within its grace period,
else puts it back in the queue; SIGKILL only after that, its finishing time and STOP_MARGIN_SECONDS), and is
restarted if it crashes, unless it could not load the model. What a child needs to configure itself (the
settings the serve process runs with) is put in its environment by the entry point (`child_env`).

Children run in a session of their own, so a terminal's Ctrl-C reaches only the serve process, which
drains its HTTP requests and then signals them once (a second signal would cut their grace short).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.processes.exit_codes import EXIT_LOAD_FAILED
from server.processes.parent import PARENT_ENV
from server.processes.wake_pipes import WAKE_FD_ENV, WakePipes
from server.worker_reports import REPORT_FD_ENV, WorkerReports

log = logging.getLogger("particalize.supervisor")

STOP_MARGIN_SECONDS = 10.0
"""Beyond the grace period, what a stopping worker may take to requeue its task and exit before SIGKILL."""


@dataclass(frozen=True)
class WorkerProcessOptions:
    count: int
    """Worker processes to run, one per GPU."""
    grace_seconds: float = 1200.0
    """A stopping worker's grace period for its running task (see server/processes/shutdown.py)."""
    finish_seconds: float = 120.0
    """The time past it that a finished video still gets to be stored and recorded."""
    child_env: Mapping[str, str] = field(default_factory=dict)
    """Added to each child's environment: what it needs to configure itself as the serve process is."""
    gpus_per_worker: int = 1
    """GPUs each worker is given (CUDA_VISIBLE_DEVICES): more than one for a context-parallel worker."""
    restart_delay: float = 2.0
    max_restarts: int = 5
    """Crashes of one slot within 5 minutes after which it is not restarted."""
    wake_pipes: bool = False
    """Give each worker a pipe that `wake` writes to (SQLite: no database notifications to wake them)."""


class WorkerProcesses:
    def __init__(self, options: WorkerProcessOptions, *, reports: WorkerReports | None = None) -> None:
        self.options = options
        self.reports = reports or WorkerReports()
        """What each child says about itself over its report pipe (/ready reads it)."""
        self.count = options.count
        self.restart_delay = options.restart_delay
        self.max_restarts = options.max_restarts
        self.processes: dict[int, subprocess.Popen] = {}
        self._restarts: dict[int, list[float]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._started = threading.Event()
        self._wake = WakePipes() if options.wake_pipes else None

    def start(self) -> WorkerProcesses:
        self._thread.start()
        self._started.wait(30)
        return self

    def _env(self, slot: int) -> dict[str, str]:
        env = {**os.environ, **self.options.child_env}
        env[PARENT_ENV] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"
        per = self.options.gpus_per_worker
        if self.count > 1:
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            devices = visible or [str(i) for i in range(self.count * per)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[(slot * per + i) % len(devices)] for i in range(per))
        return env

    def _spawn(self, slot: int) -> None:
        # Spawned from the supervisor thread, which lives as long as the children (PDEATHSIG is per thread).
        read_fd, write_fd = os.pipe()  # the child's reports (server/worker_reports.py)
        env = {**self._env(slot), REPORT_FD_ENV: str(write_fd)}
        passed = [write_fd]
        if self._wake is not None:  # and its wake-ups (server/wakeup.py)
            passed.append(self._wake.open(slot))
            env[WAKE_FD_ENV] = str(passed[-1])
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "particalize.cli", "worker", "--slot", str(slot)],
                env=env, stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=tuple(passed),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            for fd in passed:
                os.close(fd)
        threading.Thread(target=self.reports.read_pipe, args=(read_fd,), name=f"worker-{slot}-reports",
                         daemon=True).start()
        self.processes[slot] = proc
        log.info("worker slot %d started (pid %d)", slot, proc.pid)

    def _supervise(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)
        self._started.set()
        while not self._stopping.wait(0.5):
            for slot, proc in list(self.processes.items()):
                code = proc.poll()
                if code is None or self._stopping.is_set():
                    continue
                del self.processes[slot]
                if self._wake is not None:
                    self._wake.close(slot)
                if code == EXIT_LOAD_FAILED:
                    log.error("worker slot %d could not load the model (see above); it is not restarted", slot)
                    continue
                recent = [t for t in self._restarts.get(slot, []) if time.monotonic() - t < 300]
                if len(recent) >= self.max_restarts:
                    log.error("worker slot %d exited with %s and crashed %d times in 5 min; not restarted",
                              slot, code, len(recent))
                    continue
                log.warning("worker slot %d exited with %s; restarting in %.0fs", slot, code, self.restart_delay)
                self._restarts[slot] = [*recent, time.monotonic()]
                if not self._stopping.wait(self.restart_delay):
                    self._spawn(slot)
        self._terminate()

    @property
    def stop_timeout(self) -> float:
        """How long a stopping worker gets before SIGKILL: its grace period, the time a finished video may take to
        be stored past it, and a margin."""
        return self.options.grace_seconds + self.options.finish_seconds + STOP_MARGIN_SECONDS

    def _terminate(self) -> None:
        timeout = self.stop_timeout
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for slot, proc in self.processes.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker slot %d did not stop in %.0fs; killing it", slot, timeout)
                proc.kill()
                proc.wait()

    def wake(self, task_id: int, status: str) -> None:
        """Tell every worker that `task_id` reached `status` (queued: an idle one claims it; cancelled: the one
        running it stops), if they were given wake-up pipes; never blocks, never fails."""
        if self._wake is not None:
            self._wake.send(task_id, status)

    def stop(self) -> None:
        """Stop every worker: SIGTERM (a running task finishes within the grace period, else is requeued),
        SIGKILL after `stop_timeout`."""
        self._stopping.set()
        self._thread.join(self.stop_timeout + 5)
