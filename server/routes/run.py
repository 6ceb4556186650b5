"""POST /v1/Run/{owner}/{project}: validate into the task's record, store it in the queue, answer its id and
token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.answers import RunAnswer
from server.bodies import RequestFields
from server.errors import CONCURRENCY_LIMIT, GENERAL, NOT_FOUND, QUEUE_FULL, ApiError
from server.openapi import RUN_PATH, operation
from server.routes.common import answer
from server.services import Services
from server.store import NoWorker, QueueFull, TooManyActive
from server.tool_info import SLUG_OWNER, SLUG_PROJECT
from server.validation import parse_run

router = APIRouter()


@router.post(RUN_PATH, **operation("Queue a video of the start image", RunAnswer))
async def run_this_tool(request: Request) -> JSONResponse:
    return await run(request, SLUG_OWNER, SLUG_PROJECT)


@router.post("/v1/Run/{slug_owner}/{slug_project}", include_in_schema=False)  # any other slugs, or in another case
async def run(request: Request, slug_owner: str, slug_project: str) -> JSONResponse:
    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        catalogue = services.options.tool.catalogue
        tool = catalogue.find(slug_owner, slug_project)
        if tool is None:
            served = ", ".join(tool.slug for tool in catalogue.tools)
            raise ApiError(f"There is no tool {slug_owner}/{slug_project} on this server; it runs {served}.",
                           code=NOT_FOUND)
        req = parse_run(fields, services.options.limits, services.storage, services.store.uploads, owner, tool)
        try:
            task = services.store.tasks.create(req.record, req.new_upload)
        except QueueFull as exc:
            raise ApiError(str(exc), code=QUEUE_FULL) from None
        except TooManyActive as exc:
            raise ApiError(str(exc), code=CONCURRENCY_LIMIT) from None
        except NoWorker as exc:
            raise ApiError(str(exc), code=GENERAL) from None
        return {"errors": [], "taskid": str(task.id), "socketaccesstoken": task.socketaccesstoken, "result": True}

    return await answer(request, handler)
