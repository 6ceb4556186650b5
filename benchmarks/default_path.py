"""The server's default path on one device, end to end, as a worker runs it: settings → compose → memory check →
load (speed options, compile warm-up, compile cache) → one request at the seed's defaults → VAE decode → MP4.

    python -m benchmarks.default_path                        # real size (14B, 480P), random weights, on the GPU
    python -m benchmarks.default_path --small                # the tiny preset on the CPU: a check that it runs

Every setting is the server's default (PARTICALIZE_* variables apply, as in `serve`); only the model is built
with random weights (no download: speed and memory do not depend on the values). Run it twice with the same
`--data-dir` and a fresh TORCHINDUCTOR_CACHE_DIR each time: the second start is a worker's warm restart, which
loads the compile cache the first one saved. Prints a table; writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

STARTED = time.perf_counter()  # the process's start, near enough: before torch is imported

DEFAULT_LOGGERS = ("pipeline", "particalize")


class LogLines(logging.Handler):
    """The INFO lines the load writes (memory check, applied options, warm-up): kept for the JSON."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="the tiny preset at 48x32, 9 frames, on the CPU")
    p.add_argument("--model", default="wan2.1-i2v-14b-480p")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the request (the seed's: 30)")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/particalize-default-path"),
                   help="the server's data dir: the compile cache lives under it (reuse it for a warm restart)")
    p.add_argument("--label", default="start", help="a name for this run in the table and JSON (start, restart)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = LogLines()
    for name in DEFAULT_LOGGERS:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)

    import torch

    from benchmarks.memory import peak_gib, reset_peak
    from benchmarks.timing import synchronize
    from particalize import compose
    from particalize.settings import Settings
    from pipeline.generator import StepProgress
    from pipeline.params import GenerationParams
    from pipeline.video import read_mp4

    settings = Settings(model="tiny" if args.small else args.model, random_weights=not args.small,
                        data_dir=args.data_dir, weights_dir=args.data_dir / "weights",
                        device="cpu" if args.small else "auto")
    imported = time.perf_counter() - STARTED
    loading = time.perf_counter()
    generator = compose.make_generator(settings)
    synchronize(generator.device)
    load_s = time.perf_counter() - loading
    device = generator.device
    after_load = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None

    size = {"width": 48, "height": 32, "numFrames": 9} if args.small else {"width": 832, "height": 480,
                                                                          "numFrames": 81}
    params = GenerationParams(**size, steps=args.steps, scale=5.0, flowShift=5.0, seed=1)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size["height"], size["width"], 3), np.uint8))
    stamps: list[float] = []

    def progress(p: StepProgress) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    out_mp4 = args.data_dir / f"default-path-{args.label}.mp4"
    reset_peak(device, release_cache=True)
    started = time.perf_counter()
    video = generator.render(params, image, out_mp4, progress=progress)
    ended = time.perf_counter()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    meta, frames = read_mp4(out_mp4)
    applied = generator.applied
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(), "label": args.label,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
        "model": settings.model, "request": params.wiro_inputs(),
        "imports_s": imported, "load_s": load_s, "generator_load_seconds": generator.load_seconds,
        "process_start_to_ready_s": time.perf_counter() - STARTED - (ended - started),
        "memory_after_load_gib": after_load,
        "first_step_s": stamps[0] - started if stamps else None,
        "step_s": float(np.median(steps)) if steps else None, "steps_s": steps,
        "last_step_to_frames_s": ended - stamps[-1] - video.timings.get("encode", 0.0) if stamps else None,
        "mp4_encode_s": video.timings.get("encode"), "request_s": ended - started,
        "estimate_30_steps_s": (stamps[0] - started + 29 * float(np.median(steps)) + ended - stamps[-1])
        if steps else None,
        "peak_allocated_gib": peak_gib(device),
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "mp4": {"frames": int(frames.shape[0]), "size": list(meta["size"]), "bytes": out_mp4.stat().st_size},
        "applied": {"attention_backend": applied.attention_backend, "compiled": applied.compiled,
                    "fused_qkv": applied.fused_qkv, "float8": applied.float8,
                    "text_encoder_on_cpu": applied.text_encoder_on_cpu, "vae_tiling": applied.vae_tiling,
                    "memory_mode": applied.memory_mode, "step_cache": applied.step_cache,
                    "notes": applied.notes, "fallbacks": applied.fallbacks},
        "degraded": list(generator.degraded), "log": handler.lines,
    }
    print_table(result)
    out = args.out or Path(f"benchmarks/results/default-path-{device.type}-{args.label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")
    return 0 if result["mp4"]["frames"] == params.num_frames and not result["degraded"] else 1


def print_table(r: dict[str, Any]) -> None:
    rows = [("imports (torch, diffusers, ...)", r["imports_s"], "s"),
            ("load to ready (memory check, build, speed options, warm-up)", r["load_s"], "s"),
            ("process start to ready", r["process_start_to_ready_s"], "s"),
            ("GPU memory after load", r["memory_after_load_gib"], "GiB"),
            ("first step incl. encoders", r["first_step_s"], "s"),
            ("step (median of steps 2..N), CFG", r["step_s"], "s/step"),
            ("last step to frames (VAE decode, postprocess)", r["last_step_to_frames_s"], "s"),
            ("MP4 encode", r["mp4_encode_s"], "s"),
            ("request, start to MP4", r["request_s"], "s"),
            ("30-step video (estimate)", r["estimate_30_steps_s"], "s"),
            ("peak GPU memory allocated / reserved", r["peak_allocated_gib"], "GiB"),
            ("", r["peak_reserved_gib"], "GiB")]
    print(f"\ndefault path, {r['label']}, {r['device']}, {r['model']}, {r['request']['width']}x"
          f"{r['request']['height']}, {r['request']['numFrames']} frames, {r['request']['steps']} steps")
    for what, value, unit in rows:
        shown = "-" if value is None else f"{value:.3f}" if value < 100 else f"{value:.1f}"
        print(f"{what:<62}{shown:>10}  {unit}")
    print(f"applied: {json.dumps(r['applied'])}")
    print(f"degraded: {r['degraded']}; MP4: {r['mp4']}")
    for line in r["log"]:
        print(f"  log {line[:300]}")


if __name__ == "__main__":
    raise SystemExit(main())
