"""The path every /v1 call takes: authenticate (headers), read the body (any form), run the handler off the
event loop, answer JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.bodies import RequestFields, read_fields
from server.errors import NOT_FOUND, ApiError
from server.services import Services
from server.store.models import Task

Handler = Callable[[Services, str | None, RequestFields], dict[str, Any]]


def services_of(request: Request) -> Services:
    return request.app.state.services


async def authorized_fields(request: Request) -> tuple[Services, str | None, RequestFields]:
    services = services_of(request)
    owner = await run_in_threadpool(services.auth.authenticate, request.headers)
    fields = await read_fields(request, services.settings.max_body_bytes)
    return services, owner, fields


async def answer(request: Request, handler: Handler) -> JSONResponse:
    services, owner, fields = await authorized_fields(request)
    return JSONResponse(await run_in_threadpool(handler, services, owner, fields))


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
    taskid = text_field(fields, "taskid")
    token = text_field(fields, *token_names)
    if taskid is None and token is None:
        names = " or ".join(("taskid", *token_names))
        raise ApiError(f"Request parameter [taskid] is required: send {names}.")
    task = services.store.find(taskid[1] if taskid else None, token[1] if token else None, owner)
    if task is None:
        raise ApiError("There is no task yet.", code=NOT_FOUND)
    return task
