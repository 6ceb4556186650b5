"""Wall time of GPU (or CPU) work, synchronized so that queued kernels are counted; shared by the benchmarks
(memory figures: benchmarks/memory.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1, warmup: int = 0) -> tuple[float, Any]:
    """(median seconds of `repeats` calls after `warmup` untimed ones, the last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    seconds = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        result = fn()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result

