"""Tool/Detail (the one tool's input schema, defaults and this server's limits), and Tool/List and Tool/Explore
(the catalogue calls of the official client's searchModels/explore: this server's one tool)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.bodies import RequestFields
from server.errors import NOT_FOUND, ApiError
from server.routes.common import answer, int_field, text_field
from server.services import Services
from server.tool_info import SLUG_OWNER, SLUG_PROJECT, explore_item, is_this_tool, matches, tool_detail

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
        return {"result": True, "errors": [], "tool": [tool_detail(services.options.tool, services.options.limits)]}

    return await answer(request, handler)


def _categories(fields: RequestFields) -> list[str]:
    """`categories` as the client sends it (a JSON array), or as one text ("a,b" or a JSON array in a form)."""
    value = fields.values.get("categories")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise ApiError(f"Request parameter [categories] must be a list of category names, got {text[:40]!r}."
                               ) from None
        else:
            value = text.split(",")
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ApiError(f"Request parameter [categories] must be a list of category names, got {str(value)[:40]!r}.")
    return [c for c in value if c.strip()]


@router.post("/v1/Tool/List")
async def tool_list(request: Request) -> JSONResponse:
    """This server's tool when it matches `search` (every word), `categories` (any) and `slugowner`;
    `start`/`limit` page as on Wiro."""

    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        start = int_field(fields, "start", 0, 0, 10**9)
        limit = int_field(fields, "limit", 20, 1, 100)
        search = text_field(fields, "search")
        slugowner = text_field(fields, "slugowner")
        found = matches(search[1] if search else "", _categories(fields), slugowner[1] if slugowner else "")
        tools = [tool_detail(services.options.tool, services.options.limits)] if found else []
        return {"result": True, "errors": [], "total": str(len(tools)), "tool": tools[start:start + limit]}

    return await answer(request, handler)


@router.post("/v1/Tool/Explore")
async def explore(request: Request) -> JSONResponse:
    """The catalogue's front page: one category (image-to-video) holding this server's tool."""

    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        category = {"id": "1", "title": "Image to Video", "url": "image-to-video", "total": 1,
                    "tools": [explore_item()]}
        return {"result": True, "errors": [], "explore": [category]}

    return await answer(request, handler)
