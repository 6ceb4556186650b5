"""Probes for orchestrators (not part of Wiro's API; not authenticated, as /healthz and /metrics).

GET /health (liveness): this process answers, the database answers a trivial query, and a SQLite database's disk
has room to write (a full disk still reads: Run would answer 503 while a plain query says ok).
GET /ready (readiness): the database answers AND at least one worker is alive with its model loaded
(state ready or busy, heartbeat within one lease) and not paused, i.e. a task sent now will be run; `loaded` lists
each such worker's model and LoRAs. 503 otherwise, in the API's error shape, saying why. A worker this process runs
that says it is paused (server/worker_reports.py) is taken at its word, also when the store still calls it ready
(its state could not be written there).

Anyone may call these: they name no database URL, host, port or server path (the log has the details).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import APIRouter
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.errors import error_body, redact_paths
from server.routes.common import services_of
from server.store import Store
from server.store.outage import RETRY_AFTER, ThrottledLog, describe
from server.worker_reports import WorkerReports

log = logging.getLogger("particalize.server")
router = APIRouter()

PROBE_TIMEOUT_SECONDS = 5.0
"""A database that has not answered in this long counts as down (a probe must answer quickly)."""
SERVING_STATES = ("ready", "busy")


class Unhealthy(Exception):
    """Why this process cannot serve; the message is what the probe answers."""


_down_log = ThrottledLog(log)


def check_database(store: Store) -> None:
    """Unhealthy when the database does not answer. The driver's message (it names the host, the port or the
    SQLite file) goes to the log only."""
    try:
        with store.db.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means the same thing here: no database
        _down_log.warning("a probe found the database down: %s", describe(exc))
        raise Unhealthy(
            f"The database does not answer ({type(exc).__name__}); check that it is up and reachable at "
            "PARTICALIZE_DATABASE_URL (the server log has the details)."
        ) from None


DATABASE_DISK_FLOOR = 2**20
"""Below this much free space on a SQLite database's disk its writes fail: Run answers 503, and so does /health."""


def database_disk_problem(store: Store) -> str | None:
    """Why a SQLite database cannot be written (its disk is full: a read still answers there), or None."""
    path = store.db.sqlite_file
    if path is None:
        return None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return None  # the read before this answered: the folder is there; nothing more to tell
    if free >= DATABASE_DISK_FLOOR:
        return None
    _down_log.warning("a probe found the database's disk full (%d bytes free at %s)", free, path.parent)
    return (f"The database's disk is full ({free} bytes free): nothing can be written, so Run answers 503. Free some "
            "space on the disk that holds PARTICALIZE_DATABASE_URL's file.")


def is_serving(store: Store, worker: Any, now: float) -> bool:
    """Alive (its heartbeat within one lease) with its model loaded."""
    return worker.state in SERVING_STATES and store.workers.heartbeat_fresh(worker, now)


def serving_workers(store: Store, workers: Iterable[Any], now: float, paused: Mapping[str, str]) -> list[Any]:
    """The workers a task sent now would go to: serving, and not paused by their own word."""
    return [w for w in workers if w.id not in paused and is_serving(store, w, now)]


def not_ready_reason(store: Store, workers: Iterable[Any], now: float,
                     paused: Mapping[str, str] | None = None) -> str | None:
    """None when at least one worker is serving; else why no task would run now. `paused`: what this process's own
    workers say (worker id -> why), which wins over the store's record of them."""
    paused = paused or {}
    workers = list(workers)
    if serving_workers(store, workers, now, paused):
        return None
    seen = []
    for w in workers:
        if w.id in paused:
            seen.append(f"{w.id} is paused: {redact_paths(paused[w.id])}")
        elif w.state in SERVING_STATES:
            lease = store.workers.lease_seconds
            seen.append(f"{w.id} last seen {now - w.heartbeat_at:.0f}s ago (more than the {lease:g}s lease)")
        elif w.state == "paused" and w.detail:
            seen.append(f"{w.id} is paused: {redact_paths(w.detail)}")  # e.g. its disk is below the floor
        elif w.state == "failed" and w.detail:
            seen.append(f"{w.id} failed to load its model: {redact_paths(w.detail)}")  # not restarted
        else:
            seen.append(f"{w.id} is {w.state}")
    known = {w.id for w in workers}
    seen.extend(f"{worker_id} is paused: {redact_paths(why)}" for worker_id, why in paused.items()
                if worker_id not in known)
    if not seen:
        return ("No worker has registered: no task would run. Start `particalize worker` against this database, "
                "or `particalize serve` with --workers 1 or more.")
    return f"No worker is alive with its model loaded ({'; '.join(seen)}); queued tasks wait until one is."


async def _probe(request: Request, work: Any) -> JSONResponse:
    """Run `work` off the event loop within PROBE_TIMEOUT_SECONDS: 200 with its answer, or 503 saying why."""
    reports: WorkerReports = getattr(request.app.state, "worker_reports", None) or WorkerReports()
    try:
        extra = await asyncio.wait_for(run_in_threadpool(work, services_of(request), reports),
                                       PROBE_TIMEOUT_SECONDS)
    except Unhealthy as exc:
        return JSONResponse(error_body([(0, str(exc))]), status_code=503, headers=RETRY_AFTER)
    except asyncio.TimeoutError:
        message = f"The database did not answer within {PROBE_TIMEOUT_SECONDS:g}s; check that it is up and not busy."
        return JSONResponse(error_body([(0, message)]), status_code=503, headers=RETRY_AFTER)
    return JSONResponse({"result": True, "errors": [], **extra})


def _live(services: Any, reports: WorkerReports) -> dict[str, Any]:
    check_database(services.store)
    problem = database_disk_problem(services.store)
    if problem:
        raise Unhealthy(problem)
    return {"database": "ok"}


def _ready(services: Any, reports: WorkerReports) -> dict[str, Any]:
    store: Store = services.store
    check_database(store)
    workers, now, paused = store.workers.all(), time.time(), reports.paused()
    reasons = [r for r in (not_ready_reason(store, workers, now, paused), database_disk_problem(store)) if r]
    if reasons:
        raise Unhealthy(" ".join(reasons))
    serving = serving_workers(store, workers, now, paused)
    answer: dict[str, Any] = {"database": "ok", "workers": str(len(serving)),
                              "loaded": [{"worker": w.id, "model": w.model, "detail": redact_paths(w.detail)}
                                         for w in serving]}
    noise = [w.id for w in serving if w.random_weights]
    if noise:
        answer["warning"] = (f"worker(s) {', '.join(noise)} run RANDOM WEIGHTS (--random-weights): every video they "
                             "make is noise; for measuring speed and memory only")
    return answer


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    return await _probe(request, _live)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    return await _probe(request, _ready)
