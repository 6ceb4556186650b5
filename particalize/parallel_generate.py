"""`particalize generate --context-parallel ulysses --parallel-degree N`: one video over N processes started here.

Rank 0 renders and writes the MP4 (pipeline/parallel/run.LeaderGenerator broadcasts the request to the others);
the other ranks follow until rank 0 tells them to stop. A rank that fails or dies ends the command (torch's
process context stops the others)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from PIL import Image

from particalize.settings import Settings
from pipeline.params import GenerationParams


def generate_over_ranks(settings: Settings, params: GenerationParams, image: Image.Image, out: Path) -> dict:
    """Run the ranks to the end; what rank 0 reports (output, parameters, timings)."""
    import torch.multiprocessing as mp

    from pipeline.devices import pick_device

    device_type = pick_device(settings.device).type
    if device_type == "cpu" and not settings.worker_cpu_threads:
        settings = settings.with_overrides(worker_cpu_threads=max(1, (os.cpu_count() or 1) // settings.parallel_degree))
    with tempfile.TemporaryDirectory(prefix="particalize-group-") as tmp:
        report = Path(tmp) / "report.json"
        mp.start_processes(_rank_main, args=(settings, params, image, out, f"file://{tmp}/rendezvous", device_type,
                                             report), nprocs=settings.parallel_degree, join=True, start_method="spawn")
        return json.loads(report.read_text())


def _rank_main(rank: int, settings: Settings, params: GenerationParams, image: Image.Image, out: Path,
               init_method: str, device_type: str, report: Path) -> None:
    import torch

    from particalize.compose import make_generator
    from pipeline.parallel.group import ParallelSetup, init_group, leave_group
    from pipeline.parallel.run import LeaderGenerator, control_group, follow

    if settings.worker_cpu_threads and device_type == "cpu":
        torch.set_num_threads(settings.worker_cpu_threads)
    init_group(ParallelSetup(settings.context_parallel, settings.parallel_degree, rank, init_method,
                             settings.parallel_timeout_seconds), device_type)
    control = control_group()
    generator = make_generator(settings)
    if rank != 0:
        follow(generator, control)
        leave_group()
        return
    leader = LeaderGenerator(generator, control)
    try:
        video = leader.render(params, image, out)
    finally:
        leader.close()
    report.write_text(json.dumps({"output": str(out), "parameters": video.params.wiro_inputs(),
                                  "timings": {k: round(v, 3) for k, v in video.timings.items()}}))
    leave_group()  # on success only: a failed rank exits at once, its error shown
