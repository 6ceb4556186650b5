"""The path every /v1 call takes: authenticate (headers), count the call against the caller's rate limit, then
read the body (any form), run the handler off the event loop, answer JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.bodies import RequestFields, parse_fields, read_body
from server.errors import NOT_FOUND, ApiError
from server.ratelimit import RateLimiter
from server.services import Services
from server.store.models import Task

Handler = Callable[[Services, str | None, RequestFields], Any]


def services_of(request: Request) -> Services:
    return request.app.state.services


def rate_limit(request: Request, owner: str | None) -> None:
    """Count an authenticated request against its API key's limit (its client address's with no keys
    configured); ApiError code 96 over the limit."""
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    if owner is not None:
        limiter.check(owner)
    else:
        limiter.check(request.client.host if request.client else "unknown", by_address=True)


async def authorized(request: Request, handler: Handler, *, read_only: bool = False) -> Any:
    """Authenticate (headers only) and apply the rate limit before reading any body, so that an
    unauthenticated or limited request costs no memory beyond its headers; then read the body and, off the
    event loop (one hop), check strict replay protection and run `handler`.

    A `read_only` handler on SQLite runs on the event loop instead: its read (Task/Detail's two prebuilt statements
    on a local file in WAL mode, where a reader never waits for a writer) takes ~40 µs, less than the hop to a
    thread and back costs (~60-150 µs of CPU under 32 concurrent pollers, measured with benchmarks/bench_server.py).
    Strict replay protection writes a nonce, and PostgreSQL is a network round trip: those always hop."""
    services = services_of(request)
    owner = services.auth.authenticate(request.headers)
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is not None and limiter.shared:  # a network call: off the event loop
        await run_in_threadpool(rate_limit, request, owner)
    else:
        rate_limit(request, owner)
    max_bytes = services.options.limits.max_body_bytes
    body = await read_body(request, max_bytes)
    fields = await parse_fields(request, body, max_bytes)

    def work() -> Any:
        if services.auth.strict:
            services.auth.check_replay(owner, request.headers.get("x-nonce") or "", request.method,
                                       request.url.path, body)
        return handler(services, owner, fields)

    if read_only and services.store.db.is_sqlite and not services.auth.strict:
        return work()
    return await run_in_threadpool(work)


async def answer(request: Request, handler: Handler, *, read_only: bool = False) -> JSONResponse:
    """`handler`'s answer as JSON (see `authorized`; `read_only`: it only reads the store)."""
    return JSONResponse(await authorized(request, handler, read_only=read_only))


def text_field(fields: RequestFields, *names: str) -> tuple[str, str] | None:
    """The first of `names` sent with a non-empty value, as (name, text)."""
    for name in names:
        value = fields.values.get(name)
        if value is None or isinstance(value, bool | dict | list):
            continue
        text = str(value).strip()
        if text:
            return name, text
    return None


def find_task(
    services: Services, owner: str | None, fields: RequestFields, *, token_names: tuple[str, ...]
) -> Task:
    """The task named by `taskid` and/or a token field; ApiError code 1 if there is none."""
    taskid, token = identifiers(fields, token_names)
    task = services.store.reads.find(taskid, token, owner)
    if task is None:
        raise ApiError("There is no task yet.", code=NOT_FOUND)
    return task


def identifiers(fields: RequestFields, token_names: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(taskid, token) as sent; ApiError code 0 when neither is."""
    taskid = text_field(fields, "taskid")
    token = text_field(fields, *token_names)
    if taskid is None and token is None:
        names = " or ".join(("taskid", *token_names))
        raise ApiError(f"Request parameter [taskid] is required: send {names}.")
    return (taskid[1] if taskid else None), (token[1] if token else None)


def int_field(fields: RequestFields, name: str, default: int, low: int, high: int) -> int:
    """An integer field (sent as a number or as text) within [low, high]; `default` when absent or empty."""
    value = fields.values.get(name)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(str(value).strip())
    except ValueError:
        raise ApiError(f"Request parameter [{name}] must be an integer, got {str(value)[:40]!r}.") from None
    if not low <= number <= high:
        raise ApiError(f"Request parameter [{name}] must be between {low} and {high}, got {number}.")
    return number


def choice_field(fields: RequestFields, name: str, allowed: tuple[str, ...]) -> str:
    """One of `allowed` (compared in lower case), or "" when absent; ApiError code 0 naming them otherwise."""
    found = text_field(fields, name)
    if found is None:
        return ""
    value = found[1].lower()
    if value not in allowed:
        raise ApiError(f"Request parameter [{name}] must be one of {', '.join(allowed)}, got {found[1][:40]!r}.")
    return value
