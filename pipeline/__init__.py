"""Wan2.1 image-to-video generation with the Particalize LoRA, independent of any HTTP layer."""

from pipeline.errors import (
    Interrupted,
    InvalidParameter,
    LoraFuseRefused,
    LoraMismatch,
    NotEnoughMemory,
    OutOfMemory,
    PipelineError,
    WeightFormatError,
    WeightsMissing,
)
from pipeline.params import GenerationParams
from pipeline.presets import PRESETS, ModelPreset, get_preset

__all__ = [
    "PRESETS",
    "GenerationParams",
    "Interrupted",
    "InvalidParameter",
    "LoraFuseRefused",
    "LoraMismatch",
    "ModelPreset",
    "NotEnoughMemory",
    "OutOfMemory",
    "PipelineError",
    "WeightFormatError",
    "WeightsMissing",
    "get_preset",
]
