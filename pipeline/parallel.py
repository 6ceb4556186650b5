"""Multi-GPU for one video: diffusers' context parallelism (ring or Ulysses attention), under torchrun.

Every rank runs the same request with the same seed; the sequence is split across ranks inside
attention. Only rank 0 writes the output. Launch: `torchrun --nproc-per-node N particalize generate ...`
with PARTICALIZE_CONTEXT_PARALLEL=ring|ulysses.
"""

from __future__ import annotations

import os

import torch
from diffusers import ContextParallelConfig, WanImageToVideoPipeline


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def rank_device(requested: torch.device) -> torch.device:
    """Each torchrun rank owns the GPU of its local rank."""
    if requested.type != "cuda":
        return requested
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def enable_context_parallel(pipe: WanImageToVideoPipeline, mode: str, device: torch.device) -> int:
    """Join the process group and shard attention over it; returns the degree."""
    import torch.distributed as dist

    degree = world_size()
    if device.type != "cuda":
        # diffusers builds its device mesh over accelerators (torch.accelerator.device_count()).
        raise ValueError(f"context parallelism ({mode}) needs CUDA GPUs, one per torchrun process")
    if degree < 2:
        raise ValueError(f"context parallelism ({mode}) needs torchrun with 2 or more processes, got {degree}")
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    if mode == "ring":
        config = ContextParallelConfig(ring_degree=degree)
    else:
        config = ContextParallelConfig(ulysses_degree=degree)
    pipe.transformer.enable_parallelism(config=config)
    return degree
