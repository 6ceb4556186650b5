"""Tool/Detail (a tool's input schema, its defaults and this server's limits), and Tool/List and Tool/Explore
(the catalogue calls of the official client's searchModels/explore: this server's tools)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.answers import ExploreAnswer, ToolDetailAnswer, ToolListAnswer
from server.bodies import RequestFields
from server.errors import NOT_FOUND, ApiError
from server.openapi import ExploreFields, ToolFields, ToolListFields, operation
from server.routes.common import answer, int_field, text_field
from server.search import rank
from server.services import Services
from server.tool_info import (
    SLUG_OWNER,
    SLUG_PROJECT,
    Tool,
    explore_item,
    in_catalogue,
    search_document,
    tool_detail,
)

router = APIRouter()


@router.post("/v1/Tool/Detail", **operation("The tool's inputs, defaults and limits", ToolDetailAnswer, ToolFields))
async def detail(request: Request) -> JSONResponse:
    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        slug_owner = text_field(fields, "slugowner")
        slug_project = text_field(fields, "slugproject")
        asked = (slug_owner[1] if slug_owner else SLUG_OWNER, slug_project[1] if slug_project else SLUG_PROJECT)
        catalogue = services.options.tool.catalogue
        which = catalogue.find(*asked)
        if which is None:
            served = ", ".join(tool.slug for tool in catalogue.tools)
            only = " only" if len(catalogue.tools) == 1 else ""
            raise ApiError(f"slug-owner-project-not-exist: this server runs {served}{only}.", code=NOT_FOUND)
        return {"result": True, "errors": [],
                "tool": [tool_detail(services.options.tool, services.options.limits, which)]}

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


def _found(fields: RequestFields, tools: tuple[Tool, ...], entry: Callable[[Tool], dict[str, Any]]
           ) -> list[dict[str, Any]]:
    """The catalogue's tools (each as `entry` builds it) that pass the body's `categories` and `slugowner` and
    answer its `search` in plain words, best first."""
    search = text_field(fields, "search")
    slugowner = text_field(fields, "slugowner")
    categories = _categories(fields)
    passing = [tool for tool in tools if in_catalogue(categories, slugowner[1] if slugowner else "", tool)]
    return [entry(tool) for tool in rank(search[1] if search else "", [(t, search_document(t)) for t in passing])]


@router.post("/v1/Tool/List", **operation(
    "This server's tool, when it answers search (plain words: at least half of them found in its title, categories, "
    "tags, description or example prompts), categories (any) and slugowner", ToolListAnswer, ToolListFields))
async def tool_list(request: Request) -> JSONResponse:
    """This server's tool when it answers `search` (plain words: see server/search.py), `categories` (any) and
    `slugowner`, ranked by relevance; `start`/`limit` page as on Wiro."""

    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        start = int_field(fields, "start", 0, 0, 10**9)
        limit = int_field(fields, "limit", 20, 1, 100)
        options = services.options
        tools = _found(fields, options.tool.catalogue.tools,
                       lambda which: tool_detail(options.tool, options.limits, which))
        return {"result": True, "errors": [], "total": str(len(tools)), "tool": tools[start:start + limit]}

    return await answer(request, handler)


@router.post("/v1/Tool/Explore", **operation(
    "The catalogue: one category holding this server's tool (narrowed by search or categories, as Tool/List)",
    ExploreAnswer, ExploreFields))
async def explore(request: Request) -> JSONResponse:
    """The catalogue's front page: one category (image-to-video) holding this server's tool; a `search` (or
    `categories`) sent narrows it as in Tool/List (no category is answered when nothing fits)."""

    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        tools = _found(fields, services.options.tool.catalogue.tools,
                       lambda which: explore_item(services.options.tool, which))
        if not tools:
            return {"result": True, "errors": [], "explore": []}
        category = {"id": "1", "title": "Image to Video", "url": "image-to-video", "total": len(tools),
                    "tools": tools}
        return {"result": True, "errors": [], "explore": [category]}

    return await answer(request, handler)
