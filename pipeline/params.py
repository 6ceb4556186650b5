"""The hosted tool's inputs, their defaults (from the published page) and their validation.

Every value may arrive as a string ("5.0", "81"), as Wiro clients send them. Validation happens
here, before any model work, so a bad request never costs GPU time.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from functools import lru_cache
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
PIPELINE_MAX_SIDE = 1024 * 16
"""The longest side Wan2.1 can take: its rotary position table covers 1024 patches of 16 pixels per axis; a longer
side fails inside the transformer ("shape '[1, 1025, 1, -1]' is invalid"), whatever the operator's max_side."""
DEFAULT_MAX_AREA = 480 * 832
"""The 480P checkpoint's pixel budget: what width/height 0 aim for when the model's own is not known."""


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
    max_area: int = DEFAULT_MAX_AREA
    """The model's pixel budget (the resolution it was trained at), aimed for when width and height are 0."""
    fast_mode: bool = False
    """A speed LoRA is configured: requests may ask for mode "fast"."""
    cached_mode: bool = False
    """The MagCache step cache is configured: requests may ask for mode "cached"."""

    @property
    def modes_offered(self) -> tuple[str, ...]:
        """The values of `mode` a request may send (Tool/Detail lists them; a refusal names them)."""
        return offered_modes(fast=self.fast_mode, cached=self.cached_mode)


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
FAST_MODE_HELP = (
    "fast: the step-distilled speed LoRA with {fast_steps} steps, guidance scale {fast_scale:g} and flow shift "
    "{fast_flow_shift:g} (steps, scale and flowShift sent are not used; {fast_forwards} transformer forwards instead "
    "of 2 x steps). "
)
CACHED_MODE_HELP = (
    "cached: steps, scale and flowShift as sent, with calibrated step skipping (MagCache): the transformer runs only "
    "on the steps the model's calibration marks (11 of 30 with the published 480P one), the others reuse its last "
    "change; approximate; the task's parameters list the steps computed and skipped. "
)
MODE_HELP = "{fast_help}{cached_help}normal: steps, scale and flowShift as sent. Empty: this server's default."
"""The help of the modes this server offers (pipeline.inputs fills in fast_help and cached_help)."""


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
    mode: Literal["normal", "cached", "fast"] | None = Field(
        None, title="mode", description=MODE_HELP,
        json_schema_extra={"advanced": True, "needs": ["fast_mode", "cached_mode"], "default": "{default_mode}",
                           "choice_needs": {"fast": "fast_mode", "cached": "cached_mode"}},
    )
    """None: the server's mode. fast: the step-distilled speed LoRA with its own steps, scale and shift. cached:
    MagCache step skipping (pipeline.speed.step_cache_mag)."""

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


class ResolvedParams(GenerationParams):
    """One video's parameters as it runs, resolved once when its image is known (pipeline.resolve): the size set,
    the seed fixed, the mode chosen and fast mode's schedule applied. The generator runs them as they are, so what a
    task records is what ran."""

    @model_validator(mode="after")
    def _complete(self) -> ResolvedParams:
        if not (self.width and self.height) or self.seed is None or self.mode is None:
            raise ValueError("resolved parameters have a width, a height, a seed and a mode")
        return self

    @classmethod
    def of(cls, params: GenerationParams) -> ResolvedParams:
        """`params` (size, seed and mode already fixed) as the resolved value."""
        return cls.model_validate(params.model_dump())


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


@lru_cache(maxsize=16)
def model_max_area(model: str, max_area: int | None = None) -> int:
    """The pixel budget of `model` (a preset's, or a local snapshot's from its metadata; cached: a snapshot's
    metadata is read once). A model this process cannot see (an API replica without the weights) gets `max_area`
    or 480P's: the worker, which has the model, checks the size again."""
    from pipeline.presets import get_preset

    try:
        return get_preset(model, max_area=max_area).max_area
    except ValueError:
        return max_area or DEFAULT_MAX_AREA


def offered_modes(*, fast: bool, cached: bool) -> tuple[str, ...]:
    """The values of `mode` a server offers, in the order Tool/Detail lists them."""
    return ("normal", *(("cached",) if cached else ()), *(("fast",) if fast else ()))


def _one_of(values: tuple[str, ...]) -> str:
    """'a', 'a' or 'b', one of 'a', 'b' or 'c'."""
    quoted = [f"'{value}'" for value in values]
    if len(quoted) == 1:
        return quoted[0]
    return ("one of " if len(quoted) > 2 else "") + ", ".join(quoted[:-1]) + f" or {quoted[-1]}"


def no_speed_lora(offered: tuple[str, ...] = ("normal",)) -> InvalidParameter:
    """The answer to a fast-mode request on a server without a speed LoRA (checked at Run and in the worker),
    naming the modes the server offers."""
    return InvalidParameter(
        "mode", f"must be {_one_of(offered)} on this server (fast mode needs a speed LoRA: PARTICALIZE_SPEED_LORA), "
        "got 'fast'."
    )


def no_step_cache(offered: tuple[str, ...] = ("normal",), why: str = "") -> InvalidParameter:
    """The answer to a cached-mode request on a server without the MagCache step cache (at Run and in the worker),
    naming the modes the server offers; `why` says more (its hooks fell back at start)."""
    return InvalidParameter(
        "mode", f"must be {_one_of(offered)} on this server (cached mode needs the MagCache step cache: "
        f"PARTICALIZE_STEP_CACHE=mag){why}, got 'cached'."
    )


def check_limits(params: GenerationParams, limits: Limits) -> None:
    """This server's limits, in parse_params' voice."""
    if params.mode == "fast" and not limits.fast_mode:
        raise no_speed_lora(limits.modes_offered)
    if params.mode == "cached" and not limits.cached_mode:
        raise no_step_cache(limits.modes_offered)
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
        if value > longest_side(limits):
            raise InvalidParameter(name, f"must be at most {longest_side(limits)}, got {value}.")
    if params.width and params.height and params.width * params.height > limits.max_pixels:
        raise InvalidParameter(
            "width",
            f"x height must be at most {limits.max_pixels} pixels, got {params.width}x{params.height}.",
        )
    check_work(params, limits)


def longest_side(limits: Limits) -> int:
    """The operator's max_side, never beyond what the model can take."""
    return min(limits.max_side, PIPELINE_MAX_SIDE)


def size_for_image(params: GenerationParams, image_size: tuple[int, int], limits: Limits) -> GenerationParams:
    """`params` with width and height as they will run for an image of `image_size`, checked against every limit
    (side, pixels, work), so that a size the image implies is refused as plainly as one sent. Called as soon as the
    image is known: at Run for an uploaded image, in the worker for an image URL.

    Both 0: the image's aspect ratio within the model's pixel budget, also kept within max_pixels and the longest
    side. One side given: the other follows the image's aspect ratio, and is refused (not shrunk) when too long."""
    if params.width and params.height:
        return params
    budget = min(limits.max_area, limits.max_pixels)
    width, height = resolve_size(image_size, params.width, params.height, budget, limits.size_multiple)
    if not (params.width or params.height):
        width, height = _within_side(width, height, longest_side(limits), limits.size_multiple)
    sized = params.model_copy(update={"width": width, "height": height})
    _check_derived(sized, params, image_size, limits)
    check_work(sized, limits, derived=True)
    return sized


def _within_side(width: int, height: int, side: int, multiple: int) -> tuple[int, int]:
    """Both sides scaled down together until the longer is at most `side` (floored to `multiple`, never below one)."""
    longer = max(width, height)
    if longer <= side:
        return width, height
    scale = side / longer

    def floor(x: float) -> int:
        return max(multiple, int(x) // multiple * multiple)

    return floor(width * scale), floor(height * scale)


def _check_derived(sized: GenerationParams, sent: GenerationParams, image_size: tuple[int, int],
                   limits: Limits) -> None:
    """A derived size within the side and pixel limits; the message says where the size came from and what to
    change."""
    img_w, img_h = image_size
    given = [f"{name} {value}" for name, value in (("width", sent.width), ("height", sent.height)) if value]
    origin = f"derived from the {img_w}x{img_h} input image" + (f" and {given[0]}" if given else "")
    side = longest_side(limits)
    model_note = " (the longest side the model can take)" if side < limits.max_side else ""
    for name in ("width", "height"):
        value = getattr(sized, name)
        if getattr(sent, name) or value <= side:
            continue
        fix = (f"send a smaller {given[0].split()[0]}, or both width and height" if given
               else "send width and height")
        raise InvalidParameter(
            name, f"must be at most {side}{model_note}, got {value} ({origin}); {fix}, or use an image closer to the "
            "video's shape.",
        )
    pixels = sized.width * sized.height
    if pixels > limits.max_pixels:
        hint = ("the image is too thin for this server: crop it, or send width and height" if not given
                else f"send a smaller {given[0].split()[0]}, or both width and height")
        raise InvalidParameter(
            "width", f"x height must be at most {limits.max_pixels} pixels, got {sized.width}x{sized.height} "
            f"({origin}); {hint} (multiples of {limits.size_multiple}).",
        )


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
