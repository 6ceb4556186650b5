"""ComfyUI's scaled float8 checkpoints: which keys are scales, and the value each float8 weight stands for.

Two conventions exist, both with one float32 scale per weight (value = float8 weight x scale):

- the `scaled_fp8` files (Comfy-Org's repackaged Wan2.1 and UMT5 `*_fp8_scaled.safetensors`): a `scaled_fp8` marker
  tensor and `<layer>.scale_weight` next to each float8 `<layer>.weight`, optionally `<layer>.scale_input`;
- ComfyUI's newer mixed-precision files: `<layer>.weight_scale`, optionally `<layer>.input_scale`, and a
  `<layer>.comfy_quant` JSON tensor naming the format.

Input scales only matter to a float8 x float8 matmul; computing in bf16/fp32 from the dequantized weight does not use
them. Anything else (NVFP4 block scales, int8 weights, block-wise scales) is refused by name, never guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from pipeline.errors import WeightFormatError
from pipeline.weight_files.quantized_layers import FLOAT8_DTYPES

MARKER = "scaled_fp8"
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
FORMAT_SUFFIX = ".comfy_quant"
NVFP4_SUFFIX = ".weight_scale_2"
FLOAT8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


@dataclass
class ScaledWeights:
    tensors: dict[str, torch.Tensor]
    """The model's own tensors (scale, marker and format keys taken out)."""
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    """Weight key -> its float32 scale, shaped to broadcast against the weight."""
    ignored: list[str] = field(default_factory=list)
    """Keys read and deliberately not used (input scales, the marker)."""

    @property
    def scaled(self) -> bool:
        return bool(self.scales)


def _format_of(key: str, tensor: torch.Tensor) -> str:
    try:
        return str(json.loads(bytes(tensor.to(torch.uint8).tolist()).decode()).get("format"))
    except (ValueError, AttributeError) as exc:
        raise WeightFormatError(f"{key}: not a ComfyUI quantization description ({exc})") from None


def _scale_for(key: str, scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype not in FLOAT8_DTYPES:
        raise WeightFormatError(
            f"{key} scales a {str(weight.dtype).removeprefix('torch.')} weight: only float8 weights with a scale "
            "(ComfyUI's fp8 scaled files) are supported; use a bf16, fp16, fp8 or GGUF file")
    if scale.numel() == 1:
        return scale.to(torch.float32).reshape(())
    if weight.ndim == 2 and scale.numel() == weight.shape[0] and scale.squeeze().ndim == 1:
        return scale.to(torch.float32).reshape(-1, 1)  # one scale per output row
    raise WeightFormatError(
        f"{key} has shape {tuple(scale.shape)} for a weight of shape {tuple(weight.shape)}: only one scale per "
        "tensor or per output row is supported (block-wise scales are not)")


def split_scales(state_dict: dict[str, torch.Tensor]) -> ScaledWeights:
    """Take the scale keys out of a (prefix-stripped) checkpoint; WeightFormatError naming a key it cannot apply."""
    tensors = dict(state_dict)
    result = ScaledWeights(tensors)
    for key in list(tensors):
        if key.endswith(NVFP4_SUFFIX):
            raise WeightFormatError(f"{key}: NVFP4 (block-scaled 4-bit) weights are not supported; use a bf16, "
                                    "fp8 or GGUF file")
        if key.endswith(FORMAT_SUFFIX):
            fmt = _format_of(key, tensors.pop(key))
            if fmt not in FLOAT8_FORMATS:
                raise WeightFormatError(f"{key}: ComfyUI quantization format {fmt!r} is not supported (only "
                                        f"{' and '.join(FLOAT8_FORMATS)}); use a bf16, fp8 or GGUF file")
            result.ignored.append(key)
        elif key == MARKER or key.endswith(INPUT_SCALE_SUFFIXES):
            tensors.pop(key)
            result.ignored.append(key)
    for key in list(tensors):
        suffix = next((s for s in WEIGHT_SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        weight_key = key.removesuffix(suffix) + ".weight"
        scale = tensors.pop(key)
        if weight_key not in tensors:
            raise WeightFormatError(f"{key} is a scale but the file has no {weight_key}")
        result.scales[weight_key] = _scale_for(key, scale, tensors[weight_key])
    return result


def dequantize(tensor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The value a stored tensor stands for, in `dtype` (the same arithmetic as Float8Linear's forward)."""
    if scale is None:
        return tensor.to(dtype)
    return tensor.to(dtype) * scale.to(dtype)
