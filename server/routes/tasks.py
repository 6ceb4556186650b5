"""Task/Detail, Task/Kill, Task/Cancel, Task/List, Task/InputOutputDelete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.answers import EmptyAnswer, TaskListAnswer, TaskListTotalAnswer
from server.bodies import RequestFields
from server.errors import NOT_FOUND, ApiError
from server.openapi import DetailFields, ListFields, TaskFields, operation
from server.routes.common import answer, choice_field, find_task, identifiers, int_field, text_field
from server.services import Services
from server.store.models import TERMINAL, Task
from server.tool_info import named_tools

router = APIRouter()

DETAIL_TOKENS = ("tasktoken", "socketaccesstoken")
CONTROL_TOKENS = ("socketaccesstoken", "tasktoken")
MAX_LIST_LIMIT = 100


@router.post("/v1/Task/Detail", **operation("A task by taskid or tasktoken", TaskListTotalAnswer, DetailFields))
async def detail(request: Request) -> JSONResponse:
    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        found = services.store.reads.find_with_outputs(*identifiers(fields, DETAIL_TOKENS), owner)
        if found is None:
            raise ApiError("There is no task yet.", code=NOT_FOUND)
        return services.detail_body(*found)

    return await answer(request, handler, read_only=True)


def _tasklist(services: Services, task: Task) -> dict[str, Any]:
    return {"errors": [], "tasklist": services.views([task]), "result": True}


@router.post("/v1/Task/Cancel", **operation("Remove a queued task", TaskListAnswer, TaskFields))
async def cancel(request: Request) -> JSONResponse:
    """Removes a task still in the queue (it ends in task_cancel); a running task needs Task/Kill."""

    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        task = find_task(services, owner, fields, token_names=CONTROL_TOKENS)
        current, cancelled = services.store.tasks.cancel_if_queued(task.id)
        if current is None:
            raise ApiError("There is no task yet.", code=NOT_FOUND)
        if not cancelled:
            hint = " Use Task/Kill to stop a running task." if current.status not in TERMINAL else ""
            raise ApiError(
                f"Task is not in a cancellable state. It is {current.status}; Task/Cancel removes queued tasks "
                f"only.{hint}",
                code=NOT_FOUND,
            )
        return _tasklist(services, current)

    return await answer(request, handler)


@router.post("/v1/Task/Kill", **operation("Stop a running task", TaskListAnswer, TaskFields))
async def kill(request: Request) -> JSONResponse:
    """Stops a running task: it is task_cancel in the answer (as the seed's Kill answer shows); its worker stops
    within one transformer block and writes no output."""

    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        task = find_task(services, owner, fields, token_names=CONTROL_TOKENS)
        outcome = services.store.tasks.request_kill(task.id)
        if outcome.task is None:
            raise ApiError("There is no task yet.", code=NOT_FOUND)
        if not outcome.accepted:
            raise ApiError(f"Task could not be killed: {outcome.reason}", code=NOT_FOUND)
        return _tasklist(services, outcome.task)

    return await answer(request, handler)


@router.post("/v1/Task/List", **operation("This API key's tasks, newest first", TaskListTotalAnswer, ListFields))
async def task_list(request: Request) -> JSONResponse:
    """This server's tasks (of the calling API key), newest first; `start`/`limit` page through them. The official
    client's filters are honoured: `type` (model; this server runs no other kind of task), `sort` (id or
    createtime), `order` (DESC or ASC) and `modelName` (a tool's "owner/project" or a part of it: the tasks of the
    tools it names; a name of no tool lists nothing)."""

    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        start = int_field(fields, "start", 0, 0, 10**9)
        limit = int_field(fields, "limit", 20, 1, MAX_LIST_LIMIT)
        kind = (text_field(fields, "type") or ("type", "model"))[1].lower()
        choice_field(fields, "sort", ("id", "createtime"))
        order = choice_field(fields, "order", ("desc", "asc"))
        model = text_field(fields, "modelName", "model")
        catalogue = services.options.tool.catalogue
        named = None if model is None else named_tools(model[1], catalogue)
        if kind not in ("model", "all") or named == []:
            return {"total": "0", "errors": [], "tasklist": [], "result": True}
        tools = None if named is None or len(named) == len(catalogue.tools) else [tool.slug for tool in named]
        total, tasks = services.store.reads.list(owner, start, limit, ascending=order == "asc", tools=tools)
        return {"total": str(total), "errors": [], "tasklist": services.views(tasks), "result": True}

    return await answer(request, handler)


@router.post("/v1/Task/InputOutputDelete", **operation("Delete a finished task's files", EmptyAnswer, TaskFields))
async def input_output_delete(request: Request) -> JSONResponse:
    """Deletes a finished task's output files and uploaded input; the task and its parameters stay.
    Idempotent."""

    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        if text_field(fields, "tasktoken", "socketaccesstoken", "taskid") is None:
            raise ApiError("Request parameter [tasktoken] is required.")
        try:
            task = find_task(services, owner, fields, token_names=DETAIL_TOKENS)
        except ApiError as exc:
            if exc.code == NOT_FOUND:
                raise ApiError("task-not-exist: There is no such task.", code=NOT_FOUND) from None
            raise
        if task.status not in TERMINAL:
            raise ApiError(f"Task must be completed or cancelled before deleting files (it is {task.status}).")
        removed = services.storage.remove(services.store.uploads.delete_task_files(task.id))
        if not (services.storage.discard_task(task.uuid) and removed):
            raise ApiError("The task's output files could not be deleted from the output storage (the server log "
                           "says why); send the same request again.")
        return {"result": True, "errors": []}

    return await answer(request, handler)
