"""Probes for orchestrators (not part of Wiro's API; not authenticated, as /healthz and /metrics).

GET /health (liveness): this process answers and the database answers a trivial query.
GET /ready (readiness): the database answers AND at least one worker is alive with its model loaded
(state ready or busy, heartbeat within one lease), i.e. a task sent now will be run; `loaded` lists each such
worker's model and LoRAs. 503 otherwise, in the API's error shape, saying why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.errors import error_body
from server.routes.common import services_of
from server.store import Store
from server.store.outage import RETRY_AFTER

router = APIRouter()

PROBE_TIMEOUT_SECONDS = 5.0
"""A database that has not answered in this long counts as down (a probe must answer quickly)."""
SERVING_STATES = ("ready", "busy")


class Unhealthy(Exception):
    """Why this process cannot serve; the message is what the probe answers."""


def check_database(store: Store) -> None:
    try:
        with store.db.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means the same thing here: no database
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise Unhealthy(
            f"The database does not answer ({type(exc).__name__}: {first_line}); check that it is up and "
            "reachable at PARTICALIZE_DATABASE_URL."
        ) from None


def is_serving(store: Store, worker: Any, now: float) -> bool:
    """Alive (its heartbeat within one lease) with its model loaded."""
    return worker.state in SERVING_STATES and store.workers.heartbeat_fresh(worker, now)


def not_ready_reason(store: Store, workers: Iterable[Any], now: float) -> str | None:
    """None when at least one worker is serving; else why no task would run now."""
    seen = []
    for w in workers:
        if is_serving(store, w, now):
            return None
        if w.state in SERVING_STATES:
            lease = store.workers.lease_seconds
            seen.append(f"{w.id} last seen {now - w.heartbeat_at:.0f}s ago (more than the {lease:g}s lease)")
        elif w.state == "paused" and w.detail:
            seen.append(f"{w.id} is paused: {w.detail}")  # e.g. its disk is below the floor
        else:
            seen.append(f"{w.id} is {w.state}")
    if not seen:
        return ("No worker has registered: no task would run. Start `particalize worker` against this database, "
                "or `particalize serve` with --workers 1 or more.")
    return f"No worker is alive with its model loaded ({'; '.join(seen)}); queued tasks wait until one is."


async def _probe(request: Request, work: Any) -> JSONResponse:
    """Run `work` off the event loop within PROBE_TIMEOUT_SECONDS: 200 with its answer, or 503 saying why."""
    try:
        extra = await asyncio.wait_for(run_in_threadpool(work, services_of(request)), PROBE_TIMEOUT_SECONDS)
    except Unhealthy as exc:
        return JSONResponse(error_body([(0, str(exc))]), status_code=503, headers=RETRY_AFTER)
    except asyncio.TimeoutError:
        message = f"The database did not answer within {PROBE_TIMEOUT_SECONDS:g}s; check that it is up and not busy."
        return JSONResponse(error_body([(0, message)]), status_code=503, headers=RETRY_AFTER)
    return JSONResponse({"result": True, "errors": [], **extra})


def _live(services: Any) -> dict[str, Any]:
    check_database(services.store)
    return {"database": "ok"}


def _ready(services: Any) -> dict[str, Any]:
    store: Store = services.store
    check_database(store)
    workers, now = store.workers.all(), time.time()
    reason = not_ready_reason(store, workers, now)
    if reason is not None:
        raise Unhealthy(reason)
    serving = [w for w in workers if is_serving(store, w, now)]
    answer: dict[str, Any] = {"database": "ok", "workers": str(len(serving)),
                              "loaded": [{"worker": w.id, "model": w.model, "detail": w.detail} for w in serving]}
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
