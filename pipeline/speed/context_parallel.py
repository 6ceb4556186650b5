"""Context parallelism as a speed option: which attention backends diffusers runs under it, the GPU each rank owns,
and sharding the transformer's attention over the process group this process has already joined.

The group itself (joining it, the checks before loading, the per-step stop) is pipeline.parallel's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from unittest import mock

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, WanImageToVideoPipeline

LSE_BACKENDS = frozenset({"flash", "flash_hub", "flash_varlen_hub", "_flash_3_hub", "_flash_3_varlen_hub",
                          "_native_cudnn", "_native_flash", "sage", "sage_hub"})
"""The attention backends diffusers allows under context parallelism that return the log-sum-exp, which ring
attention merges its partial results with (diffusers 0.42: `native` and the other SDPA-by-choice backends raise on
return_lse=True; FlashAttention-4 and FA3 are refused under context parallelism altogether)."""

CP_BACKENDS = LSE_BACKENDS | {"native", "_native_npu"}
"""The backends diffusers 0.42 registers as supporting context parallelism."""

AUTO_CP_BACKENDS = {"ulysses": ("_native_cudnn", "_native_flash", "native"), "ring": ("_native_cudnn", "_native_flash")}
"""What `attention_backend=auto` tries on CUDA under context parallelism, in order: SDPA's cuDNN kernel, SDPA's
flash kernel (both return the log-sum-exp), then plain SDPA (Ulysses only)."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def rank_device(requested: torch.device) -> torch.device:
    """Each rank owns the GPU of its rank on this machine."""
    if requested.type != "cuda":
        return requested
    local = int(os.environ.get("LOCAL_RANK", rank()))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


@contextlib.contextmanager
def _cpu_as_one_device(device: torch.device) -> Iterator[None]:
    """diffusers places rank r on device `r % torch.accelerator.device_count()`, which is 0 with no accelerator
    (ModelMixin._resolve_parallel_config): on the CPU, every rank's device is the one CPU."""
    if device.type != "cpu":
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def enable_context_parallel(pipe: WanImageToVideoPipeline, mode: str, device: torch.device) -> int:
    """Shard attention over the process group this process has joined; returns the degree."""
    if not dist.is_initialized():
        raise ValueError(f"context parallelism ({mode}) runs in a process group of 2 or more processes: start it "
                         "with --parallel-degree N (PARTICALIZE_PARALLEL_DEGREE), not in a single process")
    degree = dist.get_world_size()
    config = ContextParallelConfig(**{"ring_degree" if mode == "ring" else "ulysses_degree": degree})
    with _cpu_as_one_device(device):
        pipe.transformer.enable_parallelism(config=config)
    return degree
