"""`particalize calibrate`: measure the MagCache ratios of the configured model on its real weights, write them next to
the weights (recorded in the weights manifest, so `weights verify` checks them), and say what cached mode will skip.

A preset with such a file uses it for `--step-cache mag` (over a shipped one); the 720P preset has none until then.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from particalize.settings import Settings


def add_calibrate_command(sub: Any, model_flags: Any, tool_flags: Any, settings_of: Any, tool_values_of: Any) -> None:
    """The subcommand, with the CLI's own model and tool flags (passed in: this module is imported by the CLI)."""
    calibrate = sub.add_parser(
        "calibrate", help="measure this model's MagCache ratios on its weights (one exact run; for --step-cache mag)")
    calibrate.add_argument("--image", required=True,
                           help="a representative start image (path or http(s) URL), like those you will serve")
    model_flags(calibrate)
    tool_flags(calibrate)
    calibrate.set_defaults(func=lambda args: cmd_calibrate(args, settings_of(args), tool_values_of(args)))


def cmd_calibrate(args: argparse.Namespace, settings: Settings, tool_values: dict[str, str]) -> int:
    from tqdm import tqdm

    from particalize import compose
    from particalize.image_source import read_image_source
    from pipeline.images import decode_image
    from pipeline.loader import preset_dir
    from pipeline.params import parse_params
    from pipeline.presets import get_preset
    from pipeline.speed.step_cache_mag import CALIBRATION_NAME, calibration_path, planned_schedule
    from pipeline.step_cache_calibrate import run_calibration
    from weights.manifest import record_local_file

    preset = get_preset(settings.model, max_area=settings.model_max_area)
    if settings.random_weights and not preset.is_tiny:
        raise ValueError("calibrating random weights measures nothing: run calibrate on the real weights")
    if settings.context_parallel != "none" or settings.parallel_degree > 1:
        raise ValueError("calibrate runs in one process: leave --context-parallel unset")
    # every step computed, no other cache, no compilation for one run; the mode of a request is not used here
    settings = settings.with_overrides(step_cache="none", compile=False, mode="normal")
    params = parse_params(tool_values, compose.limits(settings))
    image = decode_image(read_image_source(args.image), field="--image")
    generator = compose.make_generator(settings)
    bar = tqdm(total=params.steps, unit="step", desc="calibrating")

    def progress(p: Any) -> None:
        bar.n = p.step
        bar.refresh()

    try:
        calibration = run_calibration(generator, params, image, progress=progress)
    finally:
        bar.close()
    model_dir = preset_dir(preset, settings.weights_dir)
    path = calibration.save(calibration_path(model_dir))
    manifest = record_local_file(model_dir, CALIBRATION_NAME)
    speed = compose.speed_options(settings)
    at = {steps: planned_schedule(calibration, steps, speed.mag, tuple(calibration.ratios)).record()
          for steps in sorted({calibration.steps, 30, 40})}
    print(json.dumps({"calibration": str(path), "manifest": str(manifest), "steps": calibration.steps,
                      "passes": list(calibration.ratios), "cached_mode_would_compute": at}, indent=2))
    print(f"cached mode on {preset.name} now uses {path} (--step-cache mag; threshold {speed.mag.threshold:g}, "
          f"K {speed.mag.max_skip_steps}, retention {speed.mag.retention_ratio:g})", file=sys.stderr)
    return 0
