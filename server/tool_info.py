"""The tools this server runs (codexq/Particalize, and any of a catalogue), described as Wiro describes tools:
names, defaults and limits.

The inputs are the parameter model's (pipeline.inputs reads GenerationParams' fields: ids, labels, types,
defaults, help), with this server's limits filled in, so Tool/Detail always says what Run will accept; the two
start-image inputs, which only the HTTP API has, are described here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.fast import NORMAL, FastMode
from pipeline.images import MAX_IMAGE_PIXELS
from pipeline.inputs import ADVANCED_IDS, INPUT_IDS, ToolInput, tool_inputs
from pipeline.params import DEFAULT_PROMPT
from server.inspire import INSPIRE
from server.limits import RequestLimits
from server.search import Document

SLUG_OWNER = "codexq"
SLUG_PROJECT = "Particalize"
TITLE = "Particalize"
DESCRIPTION = "It is a lora that can Particalize anything."
README = (
    "An image-to-video LoRA for Wan2.1 (image-to-video, 14B): from one start image (a photo, a picture, a render) "
    "and a prompt, a short video in which the subject crystallizes, shatters or disintegrates into particles, shards "
    "or dust, a particle effect."
)
"""Tool/Detail's `readme`: what the tool does in plain words (the published description is one line)."""
TAGS = ["style"]
CATEGORIES = ["model", "persistent", "image-to-video", "h100", "lora-wan2.1", "checkpoint-file"]
CATEGORIES_TEXT = json.dumps(CATEGORIES)
"""In a TASK, `categories` is a JSON text (as on the published page); in Tool/Detail it is an array."""

IMAGE_FIELD = "inputImage"
"""The start image as a multipart file part (or its URL as the value)."""
IMAGE_URL_FIELD = "inputImageUrl"
TOOL_INPUTS = (IMAGE_URL_FIELD, IMAGE_FIELD, *INPUT_IDS)
"""The Run fields recorded as a task's parameters; anything else a client sends is ignored."""
ADVANCED_INPUTS = ADVANCED_IDS
"""Inputs the hosted tool does not have: Wiro clients may leave them out (Tool/Detail lists them as advanced)."""


class Tool(BaseModel):
    """One tool of the catalogue as the API describes it: its slug, texts and input defaults. Its LoRAs are the
    worker's business (the server only records which tool a task is for)."""

    model_config = ConfigDict(frozen=True)

    owner: str
    project: str
    title: str
    description: str = ""
    readme: str = ""
    categories: tuple[str, ...] = tuple(CATEGORIES)
    tags: tuple[str, ...] = ()
    trigger: str = ""
    """Put before the prompt when the prompt does not contain it (an effect LoRA's trigger word)."""
    defaults: dict[str, str] = {}
    """Tool inputs (Wiro ids) that default to other values than the parameter model's."""
    inspire: tuple[dict[str, str], ...] = ()
    request_loras: bool = False
    """A Run may add LoRAs of its own (`loras`), when the server allows them (PARTICALIZE_REQUEST_LORAS)."""

    @property
    def slug(self) -> str:
        return f"{self.owner}/{self.project}"

    def triggered(self, prompt: str) -> str:
        """The prompt with the trigger word before it, unless it holds it already (in any case)."""
        if not self.trigger or self.trigger.lower() in prompt.lower():
            return prompt
        return f"{self.trigger} {prompt}"

    def is_named(self, owner: str, project: str) -> bool:
        """Slugs are matched case-insensitively, as Wiro does."""
        return owner.lower() == self.owner.lower() and project.lower() == self.project.lower()


PARTICALIZE = Tool(owner=SLUG_OWNER, project=SLUG_PROJECT, title=TITLE, description=DESCRIPTION, readme=README,
                   tags=tuple(TAGS), inspire=INSPIRE, request_loras=True)
"""The hosted tool this server replaces: always served, and the default. It takes request LoRAs when the server
allows them (PARTICALIZE_REQUEST_LORAS=1), unless a tools file describes it without `request_loras = true`."""
DEFAULT_SLUG = PARTICALIZE.slug


@dataclass(frozen=True)
class Catalogue:
    """The tools this server runs, the default (codexq/Particalize) first."""

    tools: tuple[Tool, ...] = (PARTICALIZE,)

    def __post_init__(self) -> None:
        slugs = [tool.slug.lower() for tool in self.tools]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"duplicate tool slugs in {[tool.slug for tool in self.tools]}")

    @property
    def default(self) -> Tool:
        return self.tools[0]

    def find(self, owner: str, project: str) -> Tool | None:
        return next((tool for tool in self.tools if tool.is_named(owner, project)), None)

    def find_slug(self, slug: str) -> Tool | None:
        owner, _, project = slug.partition("/")
        return self.find(owner, project)


@dataclass(frozen=True)
class ToolOptions:
    """What Tool/Detail says about this server beyond its request limits."""

    model: str = "tiny"
    fast: FastMode = field(default_factory=FastMode)
    """Fast mode's sampling, offered when the request limits allow fast mode (a speed LoRA is configured)."""
    default_mode: str = NORMAL
    cost_per_second: float = 0.0
    catalogue: Catalogue = field(default_factory=Catalogue)


def named_tools(model: str, catalogue: Catalogue) -> list[Tool]:
    """The tools a model filter (Task/List's `modelName`: "owner/project" or a part of it) names."""
    wanted = model.strip().lower()
    return [tool for tool in catalogue.tools if wanted in tool.slug.lower()]


def _item(id_: str, type_: str, label: str, description: str, default: str, **extra: Any) -> dict[str, Any]:
    return {"id": id_, "type": type_, "label": label, "description": description, "default": default,
            "required": False, **extra}


def _image_items(limits: RequestLimits) -> list[dict[str, Any]]:
    note = f"at most {limits.max_image_bytes} bytes and {MAX_IMAGE_PIXELS} pixels"
    return [
        _item(IMAGE_FIELD, "fileinput", "input-image",
              "the start image (PNG, JPEG or WebP) as a multipart file part, or its http(s) URL as the value; "
              f"one of {IMAGE_FIELD} and {IMAGE_URL_FIELD} is needed", "", note=note),
        _item(IMAGE_URL_FIELD, "text", "input-image-url",
              "http(s) URL of the start image (PNG, JPEG or WebP), e.g. one File/Upload answered; one of "
              f"{IMAGE_FIELD} and {IMAGE_URL_FIELD} is needed", "", note=note),
    ]


def _input_item(spec: ToolInput, defaults: dict[str, str] | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if spec.kind == "textarea":
        extra["max"] = spec.max_length
    elif spec.kind == "select":
        extra["options"] = [{"label": choice, "value": choice} for choice in spec.choices]
    else:
        extra.update(min=spec.low, max=spec.high, step=spec.step)
    if spec.note:
        extra["note"] = spec.note
    if spec.advanced:
        extra["advanced"] = True
    return _item(spec.id, spec.kind, spec.label, spec.help, (defaults or {}).get(spec.id, spec.default), **extra)


def _inputs(tool: ToolOptions, limits: RequestLimits) -> list[ToolInput]:
    return tool_inputs(limits.params, tool.fast, tool.default_mode)


def input_items(tool: ToolOptions, limits: RequestLimits, which: Tool = PARTICALIZE) -> list[dict[str, Any]]:
    """Tool/Detail's "Input" group: the start image, then every input of the hosted tool, with `which` tool's own
    defaults."""
    return [*_image_items(limits),
            *(_input_item(spec, which.defaults) for spec in _inputs(tool, limits) if not spec.advanced)]


def advanced_groups(tool: ToolOptions, limits: RequestLimits, which: Tool = PARTICALIZE) -> list[dict[str, Any]]:
    """The inputs the hosted tool does not have, when this server offers them (`mode`: with a speed LoRA; without
    one, a request for fast mode is refused, naming the setting; `loras`: when request LoRAs are on and `which`
    tool takes them)."""
    items = [_input_item(spec) for spec in _inputs(tool, limits) if spec.advanced]
    if limits.request_loras.enabled and which.request_loras:
        items.append(_request_loras_item(limits))
    return [{"title": "Advanced", "items": items}] if items else []


def _request_loras_item(limits: RequestLimits) -> dict[str, Any]:
    options = limits.request_loras
    return _item("loras", "text", "loras",
                 "LoRAs to add to this tool's for this video: a JSON list of {\"url\", \"strength\", \"sha256\"} "
                 "(strength and sha256 optional) or 'URL[:STRENGTH],URL[:STRENGTH]'; .safetensors files made for "
                 "this base", "", advanced=True,
                 note=f"at most {options.max_count}, each at most {options.max_bytes} bytes, from "
                      f"{', '.join(options.hosts)}; strength 0-4 (default 1)")


def _tool_id(tool: ToolOptions, which: Tool) -> str:
    return str(tool.catalogue.tools.index(which) + 1)


def tool_detail(tool: ToolOptions, limits: RequestLimits, which: Tool = PARTICALIZE) -> dict[str, Any]:
    """One element of Tool/Detail's `tool` list: `which` tool of the catalogue."""
    return {
        "id": _tool_id(tool, which),
        "title": which.title,
        "slugowner": which.owner,
        "slugproject": which.project,
        "cleanslugowner": which.owner,
        "cleanslugproject": which.project.lower(),
        "description": which.description,
        "seodescription": which.description,
        "image": "",
        "computingtime": "",
        "readme": which.readme,
        "categories": list(which.categories),
        "tags": list(which.tags),
        "parameters": [{"title": "Input", "items": input_items(tool, limits, which)},
                       *advanced_groups(tool, limits, which)],
        "inspire": [dict(example) for example in which.inspire],
        "samples": [],
        "marketplace": 0,
        "onlymembers": "0",
        "cps": f"{tool.cost_per_second:.12f}",
        "dynamicprice": json.dumps([{"inputs": {}, "price": tool.cost_per_second, "priceMethod": "cps"}]),
        "model": tool.model,
    }


def search_document(which: Tool) -> Document:
    """What Tool/List's and Tool/Explore's `search` is matched against: title, categories, tags, description and the
    example prompts."""
    prompt = which.defaults.get("prompt", DEFAULT_PROMPT)
    return Document.of([
        ([which.title, which.owner, which.project], 5.0),
        (list(which.categories), 3.0),
        (list(which.tags), 3.0),
        ([which.description, which.readme, "wan2.1 lora"], 2.0),
        ([prompt, *(example["prompt"] for example in which.inspire if "prompt" in example)], 1.0),
    ])


SEARCH_DOCUMENT = search_document(PARTICALIZE)


def in_catalogue(categories: list[str] | None = None, slugowner: str = "", which: Tool = PARTICALIZE) -> bool:
    """Whether `which` tool passes a catalogue query's filters: any of `categories`, its owner `slugowner`
    (case-insensitive); `search` is ranked separately (search_document)."""
    if categories and not {c.strip().lower() for c in categories} & {c.lower() for c in which.categories}:
        return False
    return not slugowner or slugowner.strip().lower() == which.owner.lower()


def explore_item(tool: ToolOptions, which: Tool = PARTICALIZE) -> dict[str, Any]:
    """`which` tool as one entry of Tool/Explore's `tools` lists."""
    return {
        "id": _tool_id(tool, which), "title": which.title, "slugowner": which.owner, "slugproject": which.project,
        "cleanslugowner": which.owner, "cleanslugproject": which.project.lower(), "image": "",
        "description": which.description, "categories": list(which.categories), "commentcount": "0",
        "ratedusercount": "0", "averagepoint": "0", "discount": None,
    }
