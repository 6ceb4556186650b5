"""Out of memory during a run: recognised by type (torch's OutOfMemoryError, Python's MemoryError), by message as a
fallback (a backend that raises a plain RuntimeError), and told as what was asked and what to lower or switch on."""

from __future__ import annotations

import sys
from typing import Any

from pipeline.params import GenerationParams

OOM_MESSAGES = ("out of memory", "cuda error: out of memory", "can't allocate memory", "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failed: torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError) or MemoryError by type;
    otherwise a RuntimeError whose message says so. torch is only looked at when already imported (an API process
    that never loaded the model has no torch error to recognise)."""
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError):
        return True
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(message in text for message in OOM_MESSAGES)


def out_of_memory_message(exc: BaseException, params: GenerationParams, phase: str, device: Any,
                          applied: Any = None) -> str:
    """What a user reads: the size asked, the phase, and what would need less memory (the options not already on,
    from pipeline.speed.acceleration.Applied)."""
    what = "RAM" if getattr(device, "type", "cpu") != "cuda" else f"GPU memory ({device})"
    asked = (f"{params.width}x{params.height}, {params.num_frames} frames, {params.steps} steps")
    lower = "ask for a smaller width/height or fewer frames (numFrames)"
    if phase.startswith("encoding"):
        lower = "try again (a prompt's encoding does not depend on the video's size)"
    switch = []
    if applied is not None and getattr(device, "type", "cpu") == "cuda":
        if phase.startswith("decoding") and not applied.vae_tiling:
            switch.append("PARTICALIZE_VAE_TILING=1")
        if not applied.float8:
            switch.append("PARTICALIZE_FLOAT8=1")
        if not applied.text_encoder_on_cpu and applied.memory_mode == "none":
            switch.append("PARTICALIZE_TEXT_ENCODER_ON_CPU=1")
        if applied.memory_mode == "none":
            switch.append("PARTICALIZE_MEMORY_MODE=model_cpu_offload (or group_offload)")
    operator = f"; or the operator switches on {', '.join(switch)}" if switch else ""
    kind = type(exc).__name__
    return (f"Out of {what} while {phase} a {asked} video ({kind}); {lower}{operator}. Steps do not change the "
            "memory a run needs, only its time.")
