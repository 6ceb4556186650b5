"""The hosted tool's inputs, their defaults (from the published page) and their validation.

Every value may arrive as a string ("5.0", "81"), as Wiro clients send them. Validation happens
here, before any model work, so a bad request never costs GPU time.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import InvalidParameter

DEFAULT_PROMPT = (
    "a dog is crystallizing, fracturing, and disintegrating into sharp, translucent shards. The form breaks "
    "apart in slow motion, exploding into glittering crystal fragments that scatter and fall to the ground."
)
DEFAULT_NEGATIVE_PROMPT = "bad quality video"
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class Limits:
    """The operator's limits (composed at the top from its configuration); the hard ranges below apply on top."""

    max_num_frames: int = 161
    max_steps: int = 100
    max_side: int = 1920
    max_pixels: int = 1280 * 720
    max_work: int = 81 * 1280 * 720 * 50
    """Most numFrames x width x height x steps (a 720P, 81-frame, 50-step video): bounds one task's GPU time."""
    size_multiple: int = 16
    fast_mode: bool = False
    """A speed LoRA is configured: requests may ask for mode "fast"."""


def _numeric(value: Any, *, integer: bool) -> Any:
    """Accept numbers sent as strings; refuse booleans, NaN and infinities. (parse_params adds the value as sent
    to each message.)"""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool):
        raise ValueError(f"must be {kind}, not a boolean")
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        try:
            value = float(text) if any(c in text for c in ".eE") or not integer else int(text)
        except ValueError:
            raise ValueError(f"must be {kind}") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"must be {kind} (finite)")
        if integer:
            if not value.is_integer():
                raise ValueError("must be a whole number")
            return int(value)
    return value


SIDE_HELP = "0: from the input image's aspect ratio; else a multiple of {size_multiple}"
MODE_HELP = (
    "fast: the step-distilled speed LoRA with {fast_steps} steps, guidance scale {fast_scale:g} and flow shift "
    "{fast_flow_shift:g} (steps, scale and flowShift sent are not used; {fast_forwards} transformer forwards instead "
    "of 2 x steps). normal: steps, scale and flowShift as sent. Empty: this server's default."
)


class GenerationParams(BaseModel):
    """One video's parameters, named as the hosted tool names them (aliases) or in snake_case.

    Each field is also the tool input's whole description (pipeline.inputs reads it for Tool/Detail, the OpenAPI
    document and the CLI's flags): its Wiro id (the alias), type, default and hard range, its label on the
    published page (title), its help (description) and, in json_schema_extra, what this server's limits add: the
    `Limits` attribute bounding it (`max`), its `step`, a `note`, a `min` a client may send besides the range,
    and whether it is `advanced` (not an input of the hosted tool) and which `Limits` flag it `needs`. Texts name
    the limits they quote as {format} fields.
    """

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    prompt: str = Field(DEFAULT_PROMPT, max_length=MAX_PROMPT_CHARS, title="prompt",
                        description="What happens in the video.")
    negative_prompt: str = Field(DEFAULT_NEGATIVE_PROMPT, alias="negativePrompt", max_length=MAX_PROMPT_CHARS,
                                 title="negativePrompt", description="negative prompt")
    fps: int = Field(16, ge=1, le=60, title="fps", description="frame rate of the output video")
    width: int = Field(0, ge=0, title="width", description=SIDE_HELP,
                       json_schema_extra={"max": "max_side", "step": "size_multiple"})
    height: int = Field(0, ge=0, title="height", description=SIDE_HELP,
                        json_schema_extra={"max": "max_side", "step": "size_multiple",
                                           "note": "width x height at most {max_pixels} pixels"})
    num_frames: int = Field(81, alias="numFrames", ge=1, title="num-frames", description="4*n + 1",
                            json_schema_extra={"max": "max_num_frames", "step": 4})
    steps: int = Field(30, ge=1, title="inferencesteps", description="denoising steps",
                       json_schema_extra={"max": "max_steps"})
    scale: float = Field(5.0, ge=0.0, le=30.0, title="guidancescale", description="classifier-free guidance scale")
    flow_shift: float = Field(5.0, alias="flowShift", gt=0.0, le=50.0, title="flowShift",
                              description="flow shift (greater than 0)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, title="seed",
                             description="empty or -1: random; the seed used is recorded in the task",
                             json_schema_extra={"min": -1})
    mode: Literal["normal", "fast"] | None = Field(
        None, title="mode", description=MODE_HELP,
        json_schema_extra={"advanced": True, "needs": "fast_mode", "default": "{default_mode}"},
    )
    """None: the server's mode. fast: the step-distilled speed LoRA with its own steps, scale and shift."""

    @field_validator("fps", "width", "height", "num_frames", "steps", mode="before")
    @classmethod
    def _int_from_text(cls, value: Any) -> Any:
        return _numeric(value, integer=True)

    @field_validator("scale", "flow_shift", mode="before")
    @classmethod
    def _float_from_text(cls, value: Any) -> Any:
        return _numeric(value, integer=False)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> Any:
        value = _numeric(value, integer=True)
        # -1 (and empty) is the common UI convention for "random".
        return None if value is None or value == -1 else value

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("must be text")
        if "\x00" in value:
            raise ValueError("must be text without NUL characters")
        return value

    @model_validator(mode="before")
    @classmethod
    def _drop_empty(cls, data: Any) -> Any:
        # Form clients send every field, empty ones as "": those mean "use the default".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None and v != ""}
        return data

    @field_validator("num_frames", mode="after")
    @classmethod
    def _frames_shape(cls, value: int) -> int:
        if (value - 1) % 4 != 0:
            raise ValueError("must be 4*n + 1 (for example 33, 49, 81)")
        return value

    def with_seed(self) -> GenerationParams:
        """Fix a random seed now so that it can be recorded and the run reproduced."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})

    def wiro_inputs(self) -> dict[str, Any]:
        """The parameters under the hosted tool's names, as recorded with a task."""
        return self.model_dump(by_alias=True)


_WIRO_NAME = {
    name: (field.alias or name) for name, field in GenerationParams.model_fields.items()
}


_FIELD_NAME = {wiro: name for name, wiro in _WIRO_NAME.items()}


def _allowed_range(name: str) -> str:
    """What a field's bounds allow, in words ("between 1 and 60")."""
    low = high = None
    low_open = False
    for bound in GenerationParams.model_fields[name].metadata:
        if getattr(bound, "ge", None) is not None:
            low = bound.ge
        elif getattr(bound, "gt", None) is not None:
            low, low_open = bound.gt, True
        elif getattr(bound, "le", None) is not None:
            high = bound.le
    if name == "seed":
        return f"-1 (random) or between {low} and {high}"
    if low_open:
        return f"greater than {low:g} and at most {high:g}"
    if high is None:
        return f"at least {low}"
    return f"between {low:g} and {high:g}" if isinstance(low, float) else f"between {low} and {high}"


def _as_sent(value: Any) -> str:
    """The value as the client sent it, for an error message: short texts quoted, long ones by their length."""
    if isinstance(value, str) and len(value) > 40:
        return f"a text of {len(value)} characters"
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)[:40]


def _message(err: dict[str, Any], name: str) -> str:
    kind = err["type"]
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"must be {_allowed_range(name)}"
    if kind == "string_too_long":
        return f"must be at most {err['ctx']['max_length']} characters long"
    if kind.startswith("string"):
        return "must be text"
    if kind.startswith(("int", "float")):
        return "must be a number"
    return err["msg"][0].lower() + err["msg"][1:]


def parse_params(data: dict[str, Any], limits: Limits | None = None) -> GenerationParams:
    """Validate raw tool inputs; raise InvalidParameter naming the first bad field, in one voice:
    "Request parameter [field] must be <what is allowed>, got <the value as sent>"."""
    limits = limits or Limits()
    try:
        params = GenerationParams.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        name = _FIELD_NAME.get(loc[0], loc[0]) if loc else ""
        field = _WIRO_NAME.get(name, name) or "body"
        sent = data.get(field, data.get(name)) if isinstance(data, dict) else data
        raise InvalidParameter(field, f"{_message(err, name)}, got {_as_sent(sent)}.") from None
    check_limits(params, limits)
    return params


def no_speed_lora() -> InvalidParameter:
    """The answer to a fast-mode request on a server without a speed LoRA (checked at Run and in the worker)."""
    return InvalidParameter(
        "mode", "must be 'normal' on this server (fast mode needs a speed LoRA: PARTICALIZE_SPEED_LORA), got 'fast'."
    )


def check_limits(params: GenerationParams, limits: Limits) -> None:
    """This server's limits, in parse_params' voice."""
    if params.mode == "fast" and not limits.fast_mode:
        raise no_speed_lora()
    if params.num_frames > limits.max_num_frames:
        raise InvalidParameter("numFrames", f"must be at most {limits.max_num_frames}, got {params.num_frames}.")
    if params.steps > limits.max_steps:
        raise InvalidParameter("steps", f"must be at most {limits.max_steps}, got {params.steps}.")
    for name in ("width", "height"):
        value = getattr(params, name)
        if value == 0:
            continue
        if value % limits.size_multiple or value < limits.size_multiple:
            raise InvalidParameter(
                name, f"must be 0 (from the image) or a multiple of {limits.size_multiple}, got {value}."
            )
        if value > limits.max_side:
            raise InvalidParameter(name, f"must be at most {limits.max_side}, got {value}.")
    if params.width and params.height and params.width * params.height > limits.max_pixels:
        raise InvalidParameter(
            "width",
            f"x height must be at most {limits.max_pixels} pixels, got {params.width}x{params.height}.",
        )
    check_work(params, limits)


def check_work(params: GenerationParams, limits: Limits, *, derived: bool = False) -> None:
    """numFrames x width x height x steps within `limits.max_work`. A size of 0 (from the image) is not known
    yet and passes here: the worker checks again once the image is read (`derived`: the size came from it)."""
    if not (params.width and params.height):
        return
    work = params.num_frames * params.width * params.height * params.steps
    if work <= limits.max_work:
        return
    size = "width/height (here derived from the input image; send a smaller width or height)" if derived else (
        "width/height"
    )
    raise InvalidParameter(
        "numFrames",
        f"x width x height x steps is {params.num_frames} x {params.width} x {params.height} x {params.steps} = "
        f"{work}, more than the limit of {limits.max_work}; lower numFrames, steps or {size}.",
    )


def resolve_size(
    image_size: tuple[int, int], width: int, height: int, max_area: int, multiple: int
) -> tuple[int, int]:
    """Width/height 0 take the image's aspect ratio within the preset's pixel budget.

    One side given: the other follows the image's aspect ratio. Result is floored to `multiple`
    (VAE stride x patch size), never below one multiple.
    """
    img_w, img_h = image_size
    if img_w <= 0 or img_h <= 0:
        raise InvalidParameter("inputImageUrl", "must be an image with a non-zero size")
    aspect = img_h / img_w

    def snap(x: float) -> int:
        return max(multiple, int(round(x)) // multiple * multiple)

    if width and height:
        return width, height
    if width:
        return width, snap(width * aspect)
    if height:
        return snap(height / aspect), height
    return _best_fit(aspect, max_area, multiple)


def _best_fit(aspect: float, max_area: int, multiple: int) -> tuple[int, int]:
    """Of the floor/ceil multiples around the ideal size, the one within budget, closest in aspect ratio."""
    ideal_w, ideal_h = math.sqrt(max_area / aspect), math.sqrt(max_area * aspect)

    def around(x: float) -> set[int]:
        low = max(multiple, int(x) // multiple * multiple)
        return {low, low + multiple}

    fits = [(w, h) for w in around(ideal_w) for h in around(ideal_h) if w * h <= max_area]
    if not fits:
        return max(multiple, int(ideal_w) // multiple * multiple), max(multiple, int(ideal_h) // multiple * multiple)
    return min(fits, key=lambda wh: (abs(math.log((wh[1] / wh[0]) / aspect)), -wh[0] * wh[1]))
