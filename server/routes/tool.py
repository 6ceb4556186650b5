"""Tool/Detail: the one tool's input schema, defaults and this server's limits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.bodies import RequestFields
from server.errors import NOT_FOUND, ApiError
from server.routes.common import answer, text_field
from server.services import Services
from server.tool_info import SLUG_OWNER, SLUG_PROJECT, is_this_tool, tool_detail

router = APIRouter()


@router.post("/v1/Tool/Detail")
async def detail(request: Request) -> JSONResponse:
    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        slug_owner = text_field(fields, "slugowner")
        slug_project = text_field(fields, "slugproject")
        asked = (slug_owner[1] if slug_owner else SLUG_OWNER, slug_project[1] if slug_project else SLUG_PROJECT)
        if not is_this_tool(*asked):
            raise ApiError(f"slug-owner-project-not-exist: this server runs {SLUG_OWNER}/{SLUG_PROJECT} only.",
                           code=NOT_FOUND)
        return {"result": True, "errors": [], "tool": [tool_detail(services.settings)]}

    return await answer(request, handler)
