"""The path every /v1 call takes: read the body (any form), authenticate (headers), count the call against the
caller's rate limit, run the handler off the event loop, answer JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.bodies import RequestFields, read_fields
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


async def authorized(request: Request, handler: Handler) -> Any:
    """Read the body, then off the event loop (one hop): authenticate, apply the rate limit, and run
    `handler`. Authentication is decided first: a request that fails it gets 401 whatever its body; then
    a caller over its rate limit gets code 96 whatever its body."""
    services = services_of(request)
    try:
        fields, body_error = await read_fields(request, services.settings.max_body_bytes), None
    except ApiError as exc:
        fields, body_error = RequestFields(), exc

    def work() -> Any:
        owner = services.auth.authenticate(request.headers)
        rate_limit(request, owner)
        if body_error is not None:
            raise body_error
        return handler(services, owner, fields)

    return await run_in_threadpool(work)


async def answer(request: Request, handler: Handler) -> JSONResponse:
    return JSONResponse(await authorized(request, handler))


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
    task = services.store.find(taskid, token, owner)
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
