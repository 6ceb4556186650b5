"""The FastAPI application: Wiro's routes over the task store, with workers as child processes.

Request path: route (server/routes) -> validation -> task store -> worker (a child process) -> pipeline
-> storage. Every answer is JSON in Wiro's shapes; errors are `{"result": false, "errors": [...]}`
(HTTP 200 for application errors, 401 for authentication, 404 "Error parsing url." for unknown routes),
never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.callbacks import CallbackDispatcher
from server.errors import ApiError, error_body, redact_paths
from server.live_feed import EventFeed
from server.openapi import openapi_document
from server.options import ServerOptions
from server.ratelimit import RateLimiter
from server.routes import files, health, live, metrics, playground, run, tasks, tool
from server.services import Services
from server.store.commits import SqliteCommits
from server.store.models import CANCEL, QUEUED
from server.store.outage import OUTAGE_MESSAGE, RETRY_AFTER, ThrottledLog, describe, is_outage
from server.worker_reports import WorkerReports

log = logging.getLogger("particalize.server")


class Workers(Protocol):
    def stop(self) -> None: ...


def create_app(
    options: ServerOptions,
    open_services: Callable[[], Services],
    *,
    close_services: bool = True,
    start_workers: Callable[[WorkerReports], Workers] | None = None,
) -> FastAPI:
    """The app for `options`. Its lifespan opens the services (the store migrated), starts the callback sender and
    the workers (`start_workers`: worker processes reporting to the given WorkerReports, for a server that runs its
    own), and stops them on shutdown; it closes the services too unless told they are the caller's."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opened = await run_in_threadpool(open_services)
        app.state.services = opened
        # One listening connection on PostgreSQL (the live feed's) also wakes the callback sender; on SQLite it is
        # woken by the tasks this process ends, by those its own workers report ending, and by SQLite's commit
        # counter (a `particalize worker` that serve did not start tells no one).
        feed = app.state.live_feed = await run_in_threadpool(EventFeed.open, opened.store)
        sqlite_file = opened.store.db.sqlite_file
        callbacks = app.state.callbacks = CallbackDispatcher(
            opened.store, opened.detail_body, options.callbacks, listener=feed.listener,
            commits=SqliteCommits(sqlite_file) if sqlite_file is not None else None).start()
        changed = opened.store.tasks.changed
        changed.append(callbacks.task_changed)
        ended, on_end = app.state.worker_reports.ended, _wake_on_end(callbacks)
        ended.append(on_end)
        workers = None if start_workers is None else await run_in_threadpool(start_workers, app.state.worker_reports)
        wake = getattr(workers, "wake", None)
        if wake is not None:  # serve's own workers, woken directly (on SQLite: server/wakeup.py)
            wake = _wake_on_queue_or_cancel(wake)
            changed.append(wake)
        try:
            yield
        finally:
            await feed.close()
            if wake is not None:
                changed.remove(wake)
            if workers is not None:
                await run_in_threadpool(workers.stop)
            changed.remove(callbacks.task_changed)
            ended.remove(on_end)
            callbacks.stop()
            if close_services:
                opened.close()

    app = FastAPI(title="particalize", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: openapi_document(app, options)  # type: ignore[method-assign]  # adds the request bodies
    app.state.rate_limiter = RateLimiter.per_minute(options.rate_limit_per_minute,
                                                    storage_url=options.rate_limit_storage,
                                                    key_prefix=options.rate_limit_key_prefix)
    app.state.worker_reports = WorkerReports()  # what this process's workers say of themselves (/ready)
    outages = ThrottledLog(log)
    for module in (run, tasks, tool, files):
        app.include_router(module.router)
    for module in (live, metrics, playground, health):  # not Wiro's API: left out of /openapi.json
        app.include_router(module.router, include_in_schema=False)

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> JSONResponse:
        """The workers' state (not part of Wiro's API); /health and /ready are the probes."""
        store = request.app.state.services.store

        def read() -> dict[str, Any]:
            workers = [
                {"id": w.id, "state": w.state, "pid": str(w.pid), "model": w.model, "device": w.device,
                 "version": w.version, "taskid": "" if w.task_id is None else str(w.task_id),
                 "detail": redact_paths(w.detail), "heartbeat": f"{w.heartbeat_at:.3f}"}
                for w in store.workers.all()
            ]
            return {"result": True, "errors": [], "queued": str(store.reads.count("task_queue")), "workers": workers}

        return JSONResponse(await run_in_threadpool(read))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body([(exc.code, exc.message)]), status_code=exc.http_status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):
            return JSONResponse(error_body([(0, "Error parsing url.")]), status_code=404)
        return JSONResponse(error_body([(0, str(exc.detail))]), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body([(0, f"Request parameters are invalid: {exc.errors()[:1]}")]))

    @app.exception_handler(SQLAlchemyError)
    async def store_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        """A store outage is an answer (503, Retry-After) on a connection that stays usable: handled here, in the
        exception middleware, it is not re-raised to the server, which would then drop the connection."""
        if not is_outage(exc):
            return internal_error_response(request, exc)
        outages.warning("%s %s answered 503: the task store is unavailable (%s)", request.method, request.url.path,
                        describe(exc))
        return JSONResponse(error_body([(0, OUTAGE_MESSAGE)]), status_code=503, headers=RETRY_AFTER)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(request, exc)

    return app


def _wake_on_queue_or_cancel(wake: Callable[[int, str], None]) -> Callable[[int, str], None]:
    """The workers need to hear of a task queued (to claim it) or cancelled (to stop it), not of its other ends."""
    return lambda task_id, status: wake(task_id, status) if status in (QUEUED, CANCEL) else None


def _wake_on_end(callbacks: CallbackDispatcher) -> Callable[[int], None]:
    """A worker reported ending a task: its callback may be due."""
    return lambda task_id: callbacks.wake()


def internal_error_response(request: Request, exc: Exception) -> JSONResponse:
    """500 for a bug. `Connection: close` says so up front when the server is about to drop the connection
    (an unhandled exception reaches it), so a client never sends its next request on a dead connection."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_body([(0, f"Internal server error ({type(exc).__name__}); the server log has the details.")]),
        status_code=500, headers={"Connection": "close"},
    )
