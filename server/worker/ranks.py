"""One worker over N processes (context parallelism): the worker process becomes a launcher of N ranks.

The launcher spawns the ranks (torch.multiprocessing, start method spawn) and watches them. Rank 0 is the normal
worker (claims, runs and records tasks, server/worker/loop.py) whose generator broadcasts each request to the other
ranks (pipeline/parallel/run.py); the followers run what it sends. The launcher forwards its stop signals to rank 0
and, when a rank dies, ends the group: a dead follower gets rank 0 a SIGTERM (its running task fails as the group's
collectives fail, and it claims nothing more), then the launcher exits non-zero so that its supervisor starts the
group again; a dead rank 0 takes the followers with it (its task is requeued by the restarted worker, within its
attempt budget). A follower that cannot load the model exits with EXIT_LOAD_FAILED, which the launcher passes on
(no restart loop).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.processes.exit_codes import EXIT_LOAD_FAILED
from server.storage import Storage
from server.worker.entry import run_worker
from server.worker.options import WorkerOptions
from server.worker.task_run import Generator

log = logging.getLogger("particalize.worker")

BREAK_MARGIN_SECONDS = 30.0
"""Past the group's collective timeout, how long rank 0 gets to record its failed task before it is killed."""


@dataclass(frozen=True)
class RankJob:
    """What every rank of one parallel worker is built from (pickled into each spawned process)."""

    mode: str
    degree: int
    device_type: str
    timeout_seconds: float
    grace_seconds: float
    options: WorkerOptions
    make_storage: Callable[[], Storage]
    make_generator: Callable[[], Generator]
    slot: int = 0


def launch_ranks(job: RankJob, stop: threading.Event, poll_seconds: float = 0.2) -> int:
    """Run the group until rank 0 exits (or a rank dies); the launcher's exit code."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="particalize-group-") as tmp:
        init_method = f"file://{tmp}/rendezvous"
        context = mp.start_processes(_rank_main, args=(job, init_method, os.getpid()), nprocs=job.degree,
                                     join=False, start_method="spawn")
        log.info("worker slot %d: %d ranks started (%s, pids %s)", job.slot, job.degree, job.mode,
                 ", ".join(str(p.pid) for p in context.processes))
        return watch_ranks(context.processes, stop, job, poll_seconds)


def watch_ranks(processes: list[Any], stop: threading.Event, job: RankJob, poll_seconds: float) -> int:
    leader, followers = processes[0], processes[1:]
    forwarded: float | None = None
    broken_at: float | None = None
    code_when_broken = 1
    while True:
        deadline = getattr(stop, "deadline", 0.0)
        if stop.is_set() and deadline != forwarded and leader.exitcode is None:
            forwarded = deadline
            os.kill(leader.pid, signal.SIGTERM)  # a second stop signal reaches it too (it cuts the grace short)
        if leader.exitcode is not None:
            for follower in followers:
                if follower.is_alive():
                    follower.kill()  # followers hold no task: nothing to finish
                follower.join(10)
            if broken_at is not None:
                return code_when_broken
            if leader.exitcode < 0:
                log.error("rank 0 of worker slot %d died (signal %d); the group is stopped", job.slot,
                          -leader.exitcode)
                return 1
            return leader.exitcode
        # A follower exits 0 only when rank 0 told it to stop (rank 0 is leaving too): not a break.
        dead = [(rank, p.exitcode) for rank, p in enumerate(followers, 1) if p.exitcode not in (None, 0)]
        if dead and broken_at is None:
            rank, code = dead[0]
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.error("rank %d of worker slot %d stopped (%s): the context-parallel group is broken; rank 0 ends its "
                      "running task and exits, then the group is started again", rank, job.slot, how)
            code_when_broken = EXIT_LOAD_FAILED if code == EXIT_LOAD_FAILED else 1
            broken_at = time.monotonic()
            os.kill(leader.pid, signal.SIGTERM)
        if broken_at is not None and time.monotonic() - broken_at > job.timeout_seconds + BREAK_MARGIN_SECONDS:
            log.error("rank 0 of worker slot %d did not stop after the group broke; killing it", job.slot)
            leader.kill()
        time.sleep(poll_seconds)


def _rank_main(rank: int, job: RankJob, init_method: str, launcher_pid: int) -> None:
    """One rank, in its own spawned process: join the group, load the model, serve (rank 0) or follow."""
    from server.processes.parent import die_with_parent

    die_with_parent(launcher_pid)
    code = 1
    try:
        code = _rank(rank, job, init_method, launcher_pid)
    except Exception:
        log.exception("rank %d of worker slot %d failed", rank, job.slot)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _rank(rank: int, job: RankJob, init_method: str, launcher_pid: int) -> int:
    from pipeline.parallel.group import ParallelSetup, init_group
    from pipeline.parallel.run import LeaderGenerator, ParallelGroupBroken, control_group, follow
    from server.processes.shutdown import StopRequest, stop_on_signals

    init_group(ParallelSetup(job.mode, job.degree, rank, init_method, job.timeout_seconds), job.device_type)
    control = control_group()
    if rank == 0:
        stop = StopRequest(job.grace_seconds)
        stop_on_signals(stop, (signal.SIGTERM,))  # the launcher forwards SIGINT/SIGTERM as SIGTERM
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        made: list[LeaderGenerator] = []

        def make_generator() -> LeaderGenerator:
            made.append(LeaderGenerator(job.make_generator(), control, on_broken=stop.request))
            return made[0]

        code = run_worker(job.options, job.make_storage(), make_generator, stop, slot=job.slot,
                          parent_pid=launcher_pid)
        if made:
            made[0].close()
            if made[0].broken:
                return 1
        return code
    for signum in (signal.SIGINT, signal.SIGTERM):  # rank 0 says when to stop; the launcher kills if need be
        signal.signal(signum, signal.SIG_IGN)
    try:
        generator = job.make_generator()
    except Exception:
        log.exception("rank %d of worker slot %d cannot load the model", rank, job.slot)
        return EXIT_LOAD_FAILED
    try:
        follow(generator, control)  # type: ignore[arg-type]
    except ParallelGroupBroken as exc:
        log.error("rank %d of worker slot %d: %s", rank, job.slot, exc)
        return 1
    return 0
