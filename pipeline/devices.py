"""Which device a model runs on and the dtype its transformer and text encoder take there; shared by the loader and
the random-weights builder, so that a model built in code is placed as a loaded one is."""

from __future__ import annotations

import torch


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA GPU")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def serving_dtype_for(device: torch.device) -> torch.dtype:
    """The transformer's and text encoder's dtype on this device (bf16 on CUDA, as Wan's reference; float32 on CPU)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
