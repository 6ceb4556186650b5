"""Memory figures shared by the benchmarks: torch's peak GPU allocation, and a process's resident set size.

No torch import here unless a CUDA device is measured: the server benchmarks only read other processes' RSS.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def reset_peak(device: torch.device, *, release_cache: bool = False) -> None:
    """Start a new peak (CUDA only); `release_cache` also hands torch's cached blocks back first."""
    if device.type == "cuda":
        import torch

        if release_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak memory allocated by torch on the GPU since the last reset (None off CUDA)."""
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated(device)


def peak_gib(device: torch.device) -> float | None:
    peak = peak_bytes(device)
    return None if peak is None else peak / 2**30


def max_rss_bytes() -> int:
    """This process's high-water resident set (it never resets); ru_maxrss is KiB on Linux, bytes on macOS."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def rss_bytes(pid: int) -> int | None:
    """A process's resident set now (VmRSS in /proc, Linux), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None
