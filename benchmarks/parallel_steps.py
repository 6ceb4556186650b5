"""Step time against the context-parallel degree: one video over N processes (NCCL, one GPU each; gloo on the CPU).

For each degree, N ranks are spawned (as a parallel worker spawns them, pipeline/parallel/run.py), each builds the
model (the real size with random weights, or the tiny preset), and rank 0 times the denoising steps of one request
(steps 2..N; the first carries the encoders). Used by benchmarks/device_check.py (its multi-GPU part).

    python -m benchmarks.parallel_steps --degrees 2,4,8          # on a host with 8 GPUs
    python -m benchmarks.parallel_steps --small --degrees 2      # the tiny preset, 2 gloo processes on the CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.params import GenerationParams


def measure(degree: int, params: GenerationParams, model: str, small: bool, mode: str = "ulysses") -> dict[str, Any]:
    """Seconds a step (steps 2..N, rank 0) with `degree` ranks; the attention backend and notes rank 0 applied."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="parallel-steps-") as tmp:
        report = Path(tmp) / "report.json"
        started = time.perf_counter()
        mp.start_processes(_rank, args=(degree, mode, params, model, small, f"file://{tmp}/rendezvous", report),
                           nprocs=degree, join=True, start_method="spawn")
        result = json.loads(report.read_text())
        result["wall_s"] = time.perf_counter() - started
        return result


def _rank(rank: int, degree: int, mode: str, params: GenerationParams, model: str, small: bool, init_method: str,
          report: Path) -> None:
    import torch

    from pipeline.generator import GeneratorOptions, VideoGenerator
    from pipeline.parallel.group import ParallelSetup, init_group, leave_group
    from pipeline.parallel.run import LeaderGenerator, control_group, follow
    from pipeline.presets import get_preset
    from pipeline.speed.acceleration import SpeedOptions

    device = "cuda" if torch.cuda.is_available() and not small else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    init_group(ParallelSetup(mode, degree, rank, init_method, timeout_seconds=900), device)
    control = control_group()
    started = time.perf_counter()
    gen = VideoGenerator(GeneratorOptions(get_preset("tiny" if small else model), Path(report).parent / "weights",
                                          device=device, random_weights=not small,
                                          speed=SpeedOptions(context_parallel=mode, compile=False)))
    built = time.perf_counter() - started
    if rank != 0:
        follow(gen, control)
        leave_group()
        return
    leader = LeaderGenerator(gen, control)
    marks: list[float] = []
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (params.height, params.width, 3), np.uint8))
    try:
        leader.generate(params, image, progress=lambda p: marks.append(time.perf_counter()))
    finally:
        leader.close()
    steps = np.diff(marks)
    report.write_text(json.dumps({"degree": degree, "mode": mode, "step_s": float(steps.mean()) if len(steps) else None,
                                  "build_s": built, "attention_backend": gen.applied.attention_backend,
                                  "notes": gen.applied.notes}))
    leave_group()  # on success only: a failed rank exits at once, its error shown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--degrees", default="2")
    p.add_argument("--small", action="store_true")
    p.add_argument("--model", default="wan2.1-i2v-14b-480p")
    args = p.parse_args(argv)
    params = small_params() if args.small else real_params()
    for degree in (int(d) for d in args.degrees.split(",")):
        print(json.dumps(measure(degree, params, args.model, args.small)))
    return 0


def small_params() -> GenerationParams:
    return GenerationParams(width=48, height=32, numFrames=9, steps=3, scale=5.0, flowShift=5.0, seed=1)


def real_params() -> GenerationParams:
    return GenerationParams(width=832, height=480, numFrames=81, steps=3, scale=5.0, flowShift=5.0, seed=1)


if __name__ == "__main__":
    raise SystemExit(main())
