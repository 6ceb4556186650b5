"""`particalize calibrate`'s run: diffusers' MagCache calibration of the loaded model, as a calibration file's content.

Apart from pipeline.speed.step_cache_mag because it drives the warm generator, which imports that module.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from PIL import Image

from pipeline.generator import VideoGenerator
from pipeline.params import GenerationParams
from pipeline.speed.step_cache_mag import MagCacheUnavailable, MagCalibration, MagStepCache


def run_calibration(generator: VideoGenerator, params: GenerationParams, image: Image.Image,
                    progress: Callable[[Any], None] | None = None) -> MagCalibration:
    """One exact run of `params` with diffusers' MagCache hooks in calibration mode on the generator's transformer
    (never skipping; measuring each pass's ratio at every step), then the hooks off again. The generator must have
    no step cache of its own (the calibration needs every step computed, and one cache at a time)."""
    transformer = generator.pipe.transformer
    if getattr(transformer, "is_cache_enabled", False):
        raise MagCacheUnavailable("calibration runs on a model without a step cache: leave --step-cache unset")
    params = generator.resolve(params.model_copy(update={"mode": "normal"}), image)
    cache = MagStepCache(transformer, None)
    try:
        cache.prepare(params.steps, "calibrate")
        generator.generate(params, image, progress=progress)
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return cache.measured_calibration(
            source=f"particalize calibrate on {generator.preset.name}, {when} (diffusers MagCacheConfig(calibrate="
                   "True): mean over tokens of |residual at step i| / |residual at step i-1| per guidance pass)",
            model=generator.preset.name,
            calibrated_with={"steps": params.steps, "guidance_scale": params.scale, "flow_shift": params.flow_shift,
                             "num_frames": params.num_frames, "height": params.height, "width": params.width,
                             "seed": params.seed, "prompt": params.prompt,
                             "weight_files": [f"{f.role}: {f.path.name} ({f.held})" for f in generator.loaded_files]})
    finally:
        cache.remove()
