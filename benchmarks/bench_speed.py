"""Every speed/memory option against the plain path: seconds per step and per video, peak memory, PSNR.

    python -m benchmarks.bench_speed [--model tiny|wan2.1-i2v-14b-480p|DIR] [--options plain,compile,...]
        [--repeats N] [--lora PATH] [--random-weights] [--out benchmarks/results/speed-<model>.json]

Each option gets a fresh generator (so options never leak into each other), one untimed warm-up run,
then `--repeats` timed runs on the same seed. Quality is PSNR of the option's frames against the plain
path's frames (inf = identical).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.memory import max_rss_bytes, peak_gib, reset_peak
from benchmarks.timing import timed
from pipeline.generator import GeneratorOptions, StepProgress, VideoGenerator
from pipeline.lora.stack import LoraStackOptions
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.speed.acceleration import SpeedOptions

OPTIONS: dict[str, dict] = {
    "plain": {"attention_backend": "native", "compile": False, "encode_cache_size": 0},
    "default": {},  # the server's default: auto attention, compiled on CUDA, encode cache
    "attention-auto": {"attention_backend": "auto", "compile": False, "encode_cache_size": 0},
    "fa4": {"attention_backend": "flash_4", "compile": False, "encode_cache_size": 0},
    "encode-cache": {"attention_backend": "native", "compile": False},
    "cfg-batch": {"attention_backend": "native", "compile": False, "cfg_batch": True, "encode_cache_size": 0},
    "compile": {"attention_backend": "native", "compile": True, "encode_cache_size": 0},
    "fuse-qkv": {"attention_backend": "native", "compile": False, "fuse_qkv": True, "encode_cache_size": 0},
    "first-block-cache-0.05": {"attention_backend": "native", "compile": False, "step_cache": "first_block",
                               "step_cache_threshold": 0.05, "encode_cache_size": 0},
    "first-block-cache-0.1": {"attention_backend": "native", "compile": False, "step_cache": "first_block",
                              "step_cache_threshold": 0.1, "encode_cache_size": 0},
    "taylorseer-2": {"attention_backend": "native", "compile": False, "step_cache": "taylorseer",
                     "step_cache_interval": 2, "encode_cache_size": 0},
    "group-offload": {"attention_backend": "native", "compile": False, "memory_mode": "group_offload",
                      "encode_cache_size": 0},
    "model-cpu-offload": {"attention_backend": "native", "compile": False, "memory_mode": "model_cpu_offload",
                          "encode_cache_size": 0},
    "text-encoder-cpu": {"attention_backend": "native", "compile": False, "text_encoder_on_cpu": True,
                         "encode_cache_size": 0},
    "vae-tiling": {"attention_backend": "native", "compile": False, "vae_tiling": True, "encode_cache_size": 0},
    "float8": {"attention_backend": "native", "compile": False, "float8": True, "encode_cache_size": 0},
    "float8-compile": {"attention_backend": "auto", "compile": True, "float8": True},
    "best": {"attention_backend": "auto", "compile": True},
}
CUDA_ONLY = {"model-cpu-offload", "float8", "float8-compile", "fa4"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def peak_memory_gb(device: torch.device) -> float:
    """torch's peak GPU allocation on CUDA; the process-wide peak RSS on the CPU."""
    peak = peak_gib(device)
    return peak if peak is not None else max_rss_bytes() / 2**30


def run_option(name: str, args: argparse.Namespace, params: GenerationParams, image) -> dict:  # noqa: ANN001
    reset_peak(torch.device("cuda" if torch.cuda.is_available() else "cpu"), release_cache=True)
    started = time.perf_counter()
    stack = LoraStackOptions(loras=((Path(args.lora), 1.0),) if args.lora else (), fuse=args.fuse_lora)
    gen = VideoGenerator(GeneratorOptions(get_preset(args.model), Path(args.weights_dir), loras=stack,
                                          speed=SpeedOptions(**OPTIONS[name]), random_weights=args.random_weights))
    load = time.perf_counter() - started
    gen.generate(params, image)  # warm-up (compilation, caches, allocator)
    videos, steps = [], []
    frames = None
    for _ in range(args.repeats):
        stamps: list[float] = []

        def progress(p: StepProgress, stamps: list[float] = stamps) -> None:
            stamps.append(time.perf_counter())

        seconds, video = timed(functools.partial(gen.generate, params, image, progress=progress), gen.device)
        frames = video.frames
        videos.append(seconds)
        steps += [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]  # from step 2 (1 pays for encoding)
    result = {
        "option": name,
        "applied": gen.applied.notes,
        "load_s": load,
        "video_s": videos,
        "video_s_median": statistics.median(videos),
        "step_s_median": statistics.median(steps) if steps else None,
        "peak_memory_gb": peak_memory_gb(gen.device),
    }
    del gen
    return result | {"frames": frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--weights-dir", default=str(Path.home() / ".cache/particalize/weights"))
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--lora", type=Path, default=None)
    parser.add_argument("--fuse-lora", action="store_true")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--random-weights", action="store_true",
                        help="real-size model with random weights (no download): speed and memory only; PSNR means "
                        "nothing on noise")
    args = parser.parse_args()
    tiny = args.model == "tiny"
    args.repeats = args.repeats or (5 if tiny else 1)
    params = GenerationParams(
        width=args.width or (64 if tiny else 832), height=args.height or (48 if tiny else 480),
        numFrames=args.num_frames or (17 if tiny else 81), steps=args.steps or (10 if tiny else 30),
        scale=5.0, flowShift=5.0, seed=42,
        prompt="a dog is crystallizing, fracturing, and disintegrating into sharp, translucent shards",
    )
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (params.height, params.width, 3), dtype=np.uint8))
    cuda = torch.cuda.is_available()
    names = [n for n in args.options.split(",") if n]
    if "plain" not in names:
        names.insert(0, "plain")
    results, reference = [], None
    for name in names:
        if name in CUDA_ONLY and not cuda:
            results.append({"option": name, "skipped": "needs CUDA"})
            continue
        try:
            r = run_option(name, args, params, image)
        except Exception as exc:  # report and go on: one broken option must not hide the others
            results.append({"option": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        frames = r.pop("frames")
        if name == "plain":
            reference = frames
        r["psnr_vs_plain_db"] = psnr(frames, reference) if reference is not None else None
        results.append(r)

    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(f"\n{args.model} on {device}: {params.width}x{params.height}, {params.num_frames} frames, "
          f"{params.steps} steps, scale {params.scale}, repeats {args.repeats}")
    print(f"{'option':<24}{'s/step':>10}{'s/video':>10}{'peak GB':>10}{'PSNR dB':>10}  note")
    for r in results:
        if "video_s_median" not in r:
            print(f"{r['option']:<24}{'-':>10}{'-':>10}{'-':>10}{'-':>10}  {r.get('skipped') or r.get('error')}")
            continue
        step = f"{r['step_s_median']:.4f}" if r["step_s_median"] else "-"
        p = r["psnr_vs_plain_db"]
        print(f"{r['option']:<24}{step:>10}{r['video_s_median']:>10.3f}{r['peak_memory_gb']:>10.2f}"
              f"{'inf' if p == math.inf else f'{p:.1f}':>10}  {'; '.join(r['applied'][-2:])}")
    out = Path(args.out or f"benchmarks/results/speed-{Path(args.model).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"date": dt.datetime.now(dt.timezone.utc).isoformat(), "device": device,
            "torch": torch.__version__, "params": params.wiro_inputs(), "results": results}
    out.write_text(json.dumps(body, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
