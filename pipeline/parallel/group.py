"""One video over several processes: diffusers' context parallelism (Ulysses or ring attention).

Every rank runs the same request with the same seed; diffusers splits the sequence across ranks inside attention.
This module owns the process group (NCCL, one GPU a rank, on CUDA; gloo on the CPU), the checks that refuse a
combination that cannot run before any weights are read, and the one collective the ranks agree on once per step
(stop or go on); sharding the transformer over the group is a speed option (pipeline/speed/context_parallel.py).
Who starts the processes is the caller's business (the worker, `particalize generate`): see pipeline/parallel/run.py
for what each rank does with a request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.presets import ModelPreset
from pipeline.speed.context_parallel import CP_BACKENDS, LSE_BACKENDS

MODES = ("ulysses", "ring")
WAN_14B_HEADS = 40


@dataclass(frozen=True)
class ParallelSetup:
    """How a process joins its group: `init_method` is a torch.distributed URL all ranks share (file:// or tcp://)."""

    mode: str
    degree: int
    rank: int
    init_method: str
    timeout_seconds: float = 600.0
    """A collective that waits longer than this fails (a rank that died or hangs ends the task, not the group)."""


def parallel_refusal(mode: str, degree: int, heads: int, device_type: str, gpus: int, attention: str) -> str | None:
    """Why `mode` over `degree` processes cannot run this model here, or None: checked before loading anything."""
    if mode not in MODES:
        return f"context parallelism must be one of {', '.join(MODES)} (got {mode!r})"
    if degree < 2:
        return (f"context parallelism ({mode}) splits one video over 2 or more processes: set --parallel-degree N "
                f"(PARTICALIZE_PARALLEL_DEGREE) to 2 or more, or leave --context-parallel unset (got degree {degree})")
    if heads % degree:
        return (f"--parallel-degree {degree} does not divide the model's {heads} attention heads: use a divisor of "
                f"{heads} ({', '.join(str(d) for d in range(2, heads + 1) if heads % d == 0)})")
    if device_type == "cuda" and degree > gpus:
        return f"--parallel-degree {degree} needs {degree} GPUs, one a process; {gpus} found"
    if attention not in ("auto", *CP_BACKENDS):
        return (f"attention backend {attention!r} does not run under context parallelism in diffusers; use auto or "
                f"one of {', '.join(sorted(CP_BACKENDS))}")
    if mode == "ring":
        if device_type != "cuda":
            return ("ring attention needs an attention backend that returns the log-sum-exp, and on the CPU only "
                    "'native' (SDPA) runs, which does not; use --context-parallel ulysses")
        if attention != "auto" and attention not in LSE_BACKENDS:
            return (f"ring attention needs an attention backend that returns the log-sum-exp; {attention!r} does not "
                    f"(use one of {', '.join(sorted(LSE_BACKENDS))}, auto, or --context-parallel ulysses)")
    return None


def model_heads(preset: ModelPreset, weights_dir: Path) -> int:
    """The transformer's attention heads (what a degree must divide), read without loading any weights."""
    if preset.is_tiny:
        from pipeline.tiny import HEADS

        return HEADS
    from pipeline.loader import preset_dir

    config = preset_dir(preset, weights_dir) / "transformer" / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("num_attention_heads", WAN_14B_HEADS))
    return WAN_14B_HEADS


def init_group(setup: ParallelSetup, device_type: str) -> None:
    """Join the default process group (NCCL on CUDA, gloo on the CPU), bounded by the setup's timeout."""
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=setup.init_method, rank=setup.rank, world_size=setup.degree,
                            timeout=timedelta(seconds=setup.timeout_seconds))


def leave_group() -> None:
    """Leave the default process group before a rank's process exits normally, as PyTorch asks: left to the
    interpreter's exit, the backend is torn down in whatever order destructors run (a --small device check's gloo
    rank was once seen ending in SIGABRT there, under load)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_stop(stop: bool, device: torch.device) -> bool:
    """Every rank's stop flag, reduced: True on every rank when any rank says stop (one small all_reduce)."""
    flag = torch.tensor([1 if stop else 0], dtype=torch.int32,
                        device=device if device.type == "cuda" else torch.device("cpu"))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
