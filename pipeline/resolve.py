"""One request's parameters resolved once, when its image is known: at Run for an image sent or uploaded with it, in
the worker for an image URL (once fetched), in `generate` for the CLI. The result (`ResolvedParams`: size, frames,
steps, guidance, mode, seed) is stored with the task and run by the generator as it is.

The server's resolution holds the size to the operator's limits (`size_for_image`); the CLI's takes the preset's
pixel budget (`VideoGenerator.resolve`). Both choose the mode here.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.fast import CACHED, FAST, NORMAL, FastMode
from pipeline.params import (
    GenerationParams,
    Limits,
    ResolvedParams,
    check_limits,
    no_speed_lora,
    no_step_cache,
    offered_modes,
    size_for_image,
)


@dataclass(frozen=True)
class Modes:
    """The modes a server runs: the mode of a request that names none, fast mode's schedule when a speed LoRA is
    loaded (None: fast mode is refused), and whether cached mode runs (MagCache's hooks are on:
    pipeline.speed.step_cache_mag; False: cached mode is refused)."""

    default: str = NORMAL
    fast: FastMode | None = None
    cached: bool = False
    cached_note: str = ""
    """Why cached mode is refused although configured (its hooks fell back at start), added to the refusal."""

    @property
    def offered(self) -> tuple[str, ...]:
        """The mode values a request may send here, as Tool/Detail lists them."""
        return offered_modes(fast=self.fast is not None, cached=self.cached)


def with_mode(params: GenerationParams, modes: Modes) -> GenerationParams:
    """`params` with its mode chosen; in fast mode the distilled schedule replaces steps, scale and flowShift; in
    cached mode they stay as sent (MagCache skips the steps its calibration marks)."""
    mode = params.mode or modes.default
    if mode == FAST:
        if modes.fast is None:
            raise no_speed_lora(modes.offered)
        return modes.fast.apply(params)
    if mode == CACHED:
        if not modes.cached:
            raise no_step_cache(modes.offered, modes.cached_note)
        return params.model_copy(update={"mode": CACHED})
    return params.model_copy(update={"mode": NORMAL})


def resolve_request(params: GenerationParams, image_size: tuple[int, int], limits: Limits,
                    modes: Modes) -> ResolvedParams:
    """A served request's one resolution: its values within `limits`, the size the image implies (held to every
    limit), the mode and the seed. Raises InvalidParameter naming what to change."""
    check_limits(params, limits)
    sized = size_for_image(params, image_size, limits)
    return ResolvedParams.of(with_mode(sized, modes).with_seed())
