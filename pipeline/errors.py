"""Errors the pipeline raises; each message says what to change."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for errors a caller can report to a user as-is."""


class InvalidParameter(PipelineError, ValueError):
    """A tool input is out of range or malformed; raised before any model work."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"Request parameter [{name}] {message}")


class Interrupted(PipelineError):
    """The run was stopped cooperatively between denoising steps."""

    def __init__(self, step: int, total: int) -> None:
        self.step = step
        self.total = total
        super().__init__(f"interrupted after step {step} of {total}")


class WeightsMissing(PipelineError, FileNotFoundError):
    """A weights file is not on disk; the message names it and the command that fetches it."""


class LoraMismatch(PipelineError, ValueError):
    """A LoRA file does not fit the loaded transformer."""


class WeightFormatError(PipelineError, ValueError):
    """A single-file checkpoint (transformer or text encoder) cannot be loaded into the preset's model: not that
    model, another size, an unknown extension or quantization. The message names what was expected instead."""


class LoraFuseRefused(PipelineError, ValueError):
    """A LoRA cannot be fused into quantized (float8 or GGUF) base weights; the message says to keep it unfused."""


class NotEnoughMemory(PipelineError):
    """The configuration does not fit the device, found before anything is built (pipeline.memory_check): the
    message names the need per component, what is free, and which options would fit."""


class OutOfMemory(PipelineError, MemoryError):
    """A run ran out of memory; the message names the size asked and what to lower or switch on. The run's memory
    is released and the warm model serves the next run."""

    def __init__(self, message: str, phase: str) -> None:
        self.phase = phase
        super().__init__(message)
