"""The worker process: `particalize worker`, and each worker `particalize serve` starts. Its options, storage
and a way to build the model are handed in by the entry point at the top (particalize/); it opens the store,
registers, loads the model once and runs the claiming loop until told to stop."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from server.processes.exit_codes import EXIT_LOAD_FAILED
from server.storage import Storage
from server.store import open_store
from server.store.models import TERMINAL
from server.store.outage import StoreHealth
from server.wakeup import Wakeup, wakeup_for
from server.worker.loop import Worker
from server.worker.options import WorkerOptions, worker_id_for
from server.worker.task_run import Generator
from server.worker_reports import ENDED, Report

log = logging.getLogger("particalize.worker")

def loaded_detail(generator: Generator) -> tuple[str, bool]:
    """What the worker registers about its model (the detail /ready lists: load time, each LoRA, its strength and
    whether fast mode is there), and whether it is random weights."""
    loaded = f"loaded in {generator.load_seconds:.1f}s"
    if generator.loras:
        loaded += "; LoRAs: " + "; ".join(info.describe() for info in generator.loras)
    loaded += files_detail(generator)
    loaded += "".join(f"; {part}" for part in generator.degraded)
    random_weights = generator.random_weights
    if random_weights:
        from pipeline.random_weights import NOISE_WARNING

        loaded = f"{NOISE_WARNING}; {loaded}"
    return loaded, random_weights


def files_detail(generator: Generator) -> str:
    """The part of the detail naming the single weight files loaded (format, how held, memory), or ''."""
    files = generator.loaded_files
    return "; weight files: " + "; ".join(info.describe() for info in files) if files else ""


def run_worker(
    options: WorkerOptions,
    storage: Storage,
    make_generator: Callable[[], Generator],
    stop_event: threading.Event,
    *,
    slot: int = 0,
    parent_pid: int | None = None,
    report: Report | None = None,
    wakeup: Wakeup | None = None,
) -> int:
    """Load the model once (`make_generator`), then serve tasks until `stop_event` (a
    server.processes.shutdown.StopRequest gives the running task its grace period; a plain Event stops it at once).
    `report`: the pipe to the serve process that started this worker, if one did. `wakeup`: how it is woken (serve's
    pipe); by default PostgreSQL's notifications, or polling on SQLite (server/wakeup.py). Returns the process exit
    code."""
    health = StoreHealth(log)  # a worker started during a store outage waits for the store, it does not crash

    def when_up(action: Callable[[], Any]) -> Any:
        return health.retry(action, give_up=stop_event.is_set, sleep=stop_event.wait)

    store = when_up(lambda: open_store(options.store))
    worker_id = worker_id_for(options.node_name, slot)
    when_up(lambda: store.workers.register(worker_id, pid=os.getpid(), model=options.model, device="",
                                           state="loading", version=options.version))
    when_up(store.tasks.note_waiting)  # a worker is coming: queued tasks no longer say that none can serve
    try:
        generator = make_generator()
    except Exception as exc:
        log.error("worker %s cannot load model %s: %s", worker_id, options.model, exc)
        store.workers.set_state(worker_id, "failed", detail=str(exc))
        when_up(store.tasks.note_waiting)  # if no worker can serve now, queued tasks say why (server/store/waiting)
        return EXIT_LOAD_FAILED
    detail, random_weights = loaded_detail(generator)
    for part in generator.degraded:
        log.warning("worker %s: %s", worker_id, part)
    if random_weights:
        from pipeline.random_weights import NOISE_WARNING

        log.warning("worker %s: %s", worker_id, NOISE_WARNING)
    when_up(lambda: store.workers.register(worker_id, pid=os.getpid(), model=options.model,
                                           device=str(generator.device),
                                           state="stopping" if stop_event.is_set() else "ready", detail=detail,
                                           version=options.version, random_weights=random_weights))
    when_up(store.tasks.note_waiting)
    log.info("worker %s ready: model %s on %s", worker_id, options.model, generator.device)
    wakeup = wakeup or wakeup_for(store.db, options.poll_seconds, options.safety_poll_seconds)
    if report is not None:  # the tasks it ends wake serve's callback sender (without a NOTIFY on SQLite)
        store.tasks.changed.append(report_ends(report))
    worker = Worker(store, storage, generator, options, worker_id=worker_id, report=report, wakeup=wakeup)
    try:
        worker.run(stop_event, parent_pid=parent_pid)
    finally:
        try:
            wakeup.close()
            store.workers.set_state(worker_id, "stopped")
        finally:
            store.db.dispose()
    log.info("worker %s stopped after %d task(s)", worker_id, worker.tasks_done)
    return 0


def report_ends(report: Report) -> Callable[[int, str], None]:
    """A `TaskLifecycle.changed` listener for a worker process: each task it ends, reported to its serve process."""

    def tell(task_id: int, status: str) -> None:
        if status in TERMINAL:
            report(ENDED, str(task_id))

    return tell
