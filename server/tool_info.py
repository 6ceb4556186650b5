"""The one tool this server runs, described as Wiro describes tools: names, defaults and limits.

Input ids, labels, types and defaults are the published page's; the limits are this server's
(from settings), so Tool/Detail always says what Run will accept.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.images import MAX_IMAGE_PIXELS
from pipeline.params import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, MAX_PROMPT_CHARS, MAX_SEED
from server.inspire import INSPIRE
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

TOOL_INPUTS = (
    "inputImageUrl", "inputImage", "prompt", "negativePrompt", "fps", "width", "height", "numFrames", "steps",
    "scale", "flowShift", "seed",
)
"""The Run fields recorded as a task's parameters; anything else a client sends is ignored."""
ADVANCED_INPUTS = ("mode",)
"""Inputs the hosted tool does not have: Wiro clients may leave them out (Tool/Detail lists them as advanced)."""
TOOL_INPUTS += ADVANCED_INPUTS


def is_this_tool(owner: str, project: str) -> bool:
    return owner.lower() == SLUG_OWNER.lower() and project.lower() == SLUG_PROJECT.lower()


def names_this_tool(model: str) -> bool:
    """A model filter (Task/List's `modelName`: "owner/project" or a part of it) that names this tool."""
    wanted = model.strip().lower()
    return wanted in f"{SLUG_OWNER}/{SLUG_PROJECT}".lower()


def _item(id_: str, type_: str, label: str, description: str, default: str, **extra: Any) -> dict[str, Any]:
    return {"id": id_, "type": type_, "label": label, "description": description, "default": default,
            "required": False, **extra}


def input_items(settings: Any) -> list[dict[str, Any]]:
    return [
        _item("inputImage", "fileinput", "input-image",
              "the start image (PNG, JPEG or WebP) as a multipart file part, or its http(s) URL as the value; "
              "one of inputImage and inputImageUrl is needed", "",
              note=f"at most {settings.max_image_bytes} bytes and {MAX_IMAGE_PIXELS} pixels"),
        _item("inputImageUrl", "text", "input-image-url",
              "http(s) URL of the start image (PNG, JPEG or WebP), e.g. one File/Upload answered; one of "
              "inputImage and inputImageUrl is needed", "",
              note=f"at most {settings.max_image_bytes} bytes and {MAX_IMAGE_PIXELS} pixels"),
        _item("prompt", "textarea", "prompt", "What happens in the video.", DEFAULT_PROMPT,
              max=MAX_PROMPT_CHARS),
        _item("negativePrompt", "textarea", "negativePrompt", "negative prompt", DEFAULT_NEGATIVE_PROMPT,
              max=MAX_PROMPT_CHARS),
        _item("fps", "number", "fps", "frame rate of the output video", "16", min=1, max=60, step=1),
        _item("width", "number", "width", "0: from the input image's aspect ratio; else a multiple of 16",
              "0", min=0, max=settings.max_side, step=16),
        _item("height", "number", "height", "0: from the input image's aspect ratio; else a multiple of 16",
              "0", min=0, max=settings.max_side, step=16,
              note=f"width x height at most {settings.max_pixels} pixels"),
        _item("numFrames", "number", "num-frames", "4*n + 1", "81", min=1, max=settings.max_num_frames, step=4),
        _item("steps", "number", "inferencesteps", "denoising steps", "30", min=1, max=settings.max_steps,
              step=1),
        _item("scale", "float", "guidancescale", "classifier-free guidance scale", "5.0", min=0, max=30,
              step=0.1),
        _item("flowShift", "float", "flowShift", "flow shift (greater than 0)", "5.0", min=0, max=50, step=0.1),
        _item("seed", "number", "seed", "empty or -1: random; the seed used is recorded in the task", "",
              min=-1, max=MAX_SEED, step=1),
    ]


def advanced_groups(settings: Any) -> list[dict[str, Any]]:
    """`mode`, on a server with a speed LoRA (without one, a request for fast mode is refused, naming the setting)."""
    if not getattr(settings, "speed_lora", None):
        return []
    steps = settings.fast_steps
    mode = _item(
        "mode", "select", "mode",
        f"fast: the step-distilled speed LoRA with {steps} steps, guidance scale {settings.fast_scale:g} and flow "
        f"shift {settings.fast_flow_shift:g} (steps, scale and flowShift sent are not used; "
        f"{steps if settings.fast_scale <= 1 else 2 * steps} transformer forwards instead of 2 x steps). "
        "normal: steps, scale and flowShift as sent. Empty: this server's default.",
        settings.mode, options=[{"label": "normal", "value": "normal"}, {"label": "fast", "value": "fast"}],
        advanced=True,
    )
    return [{"title": "Advanced", "items": [mode]}]


def tool_detail(settings: Any) -> dict[str, Any]:
    """One element of Tool/Detail's `tool` list."""
    return {
        "id": "1",
        "title": TITLE,
        "slugowner": SLUG_OWNER,
        "slugproject": SLUG_PROJECT,
        "cleanslugowner": SLUG_OWNER,
        "cleanslugproject": SLUG_PROJECT.lower(),
        "description": DESCRIPTION,
        "seodescription": DESCRIPTION,
        "image": "",
        "computingtime": "",
        "readme": README,
        "categories": list(CATEGORIES),
        "tags": list(TAGS),
        "parameters": [{"title": "Input", "items": input_items(settings)}, *advanced_groups(settings)],
        "inspire": [dict(example) for example in INSPIRE],
        "samples": [],
        "marketplace": 0,
        "onlymembers": "0",
        "cps": f"{settings.cost_per_second:.12f}",
        "dynamicprice": json.dumps([{"inputs": {}, "price": settings.cost_per_second, "priceMethod": "cps"}]),
        "model": settings.model,
    }


SEARCH_DOCUMENT = Document.of([
    ([TITLE, SLUG_OWNER, SLUG_PROJECT], 5.0),
    (CATEGORIES, 3.0),
    (TAGS, 3.0),
    ([DESCRIPTION, README, "wan2.1 lora"], 2.0),
    ([DEFAULT_PROMPT, *(example["prompt"] for example in INSPIRE if "prompt" in example)], 1.0),
])
"""What Tool/List's and Tool/Explore's `search` is matched against: title, categories, tags, description and the
example prompts."""


def in_catalogue(categories: list[str] | None = None, slugowner: str = "") -> bool:
    """Whether this tool passes a catalogue query's filters: any of `categories`, its owner `slugowner`
    (case-insensitive); `search` is ranked separately (SEARCH_DOCUMENT)."""
    if categories and not {c.strip().lower() for c in categories} & {c.lower() for c in CATEGORIES}:
        return False
    return not slugowner or slugowner.strip().lower() == SLUG_OWNER.lower()


def explore_item() -> dict[str, Any]:
    """This tool as one entry of Tool/Explore's `tools` lists."""
    return {
        "id": "1", "title": TITLE, "slugowner": SLUG_OWNER, "slugproject": SLUG_PROJECT,
        "cleanslugowner": SLUG_OWNER, "cleanslugproject": SLUG_PROJECT.lower(), "image": "",
        "description": DESCRIPTION, "categories": list(CATEGORIES), "commentcount": "0", "ratedusercount": "0",
        "averagepoint": "0", "discount": None,
    }
