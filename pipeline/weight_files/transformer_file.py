"""A Wan2.1 transformer from one file as users have it: the original Wan layout (with or without ComfyUI's
`model.diffusion_model.` prefix) or diffusers names; fp32, bf16, fp16, fp8 (plain or ComfyUI-scaled), or GGUF.

Keys are mapped by diffusers' own single-file converter (`convert_wan_transformer_to_diffusers`) and the model is
built from the preset's config (passed in, so no hub is asked for one). Every format gives the model the project's
diffusers-directory loader (`from_pretrained`) gives: the modules diffusers keeps in float32
(`_keep_in_fp32_modules`: rope, time embedder, modulation tables, norms) in float32, the rest in the compute dtype.
How the weights are held:

- fp32 / bf16 / fp16 safetensors: as above (lossless from bf16/fp16 into a float32 or bf16 compute dtype).
- fp8 safetensors: every Linear weight the file stores in float8 stays float8 (Float8Linear: 1 byte a weight),
  times its scale when the file is ComfyUI-scaled, computed in the compute dtype.
- GGUF: `WanTransformer3DModel.from_single_file` with diffusers' `GGUFQuantizationConfig` (the config written to a
  temporary directory): Linear weights stay in their GGUF blocks, dequantized per layer at compute time.

safetensors files are not loaded with `from_single_file`: it upcasts every tensor on load (an fp8 file would take
its bf16 size) and casts the float32 modules and rope buffers to the compute dtype (it warns about that itself), so
the tensors are assigned here to a model built on the meta device, each in the dtype above.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from pipeline.errors import WeightFormatError
from pipeline.weight_files.checkpoint_fit import compare, expected_shapes
from pipeline.weight_files.checkpoint_read import (
    container_of,
    describe_counts,
    read_checkpoint,
    storage_counts,
    strip_prefix,
)
from pipeline.weight_files.loaded_file import LoadedFile, attach
from pipeline.weight_files.quantized_layers import FLOAT8_DTYPES, Float8Linear, module_bytes, quantized_layers
from pipeline.weight_files.scaled_fp8 import dequantize, split_scales

log = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."
ORIGINAL_MARKERS = ("head.modulation", "blocks.0.self_attn.q.weight")
DIFFUSERS_MARKERS = ("scale_shift_table", "blocks.0.attn1.to_q.weight")
EXPECTED_KEYS = (f"a Wan2.1 transformer file has keys like {', '.join(ORIGINAL_MARKERS)} (original Wan layout, "
                 f"optionally prefixed {COMFY_PREFIX}) or {', '.join(DIFFUSERS_MARKERS)} (diffusers)")


def empty_transformer(config: Mapping[str, Any]) -> WanTransformer3DModel:
    """The preset's transformer with its parameters on the meta device (no memory), buffers real."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return WanTransformer3DModel.from_config(dict(config))


def _layout(keys: set[str], prefixed: bool) -> str:
    if all(k in keys for k in ORIGINAL_MARKERS):
        return "ComfyUI (model.diffusion_model.)" if prefixed else "original Wan"
    if all(k in keys for k in DIFFUSERS_MARKERS):
        return "diffusers"
    shown = ", ".join(sorted(keys)[:4]) or "none"
    raise WeightFormatError(f"not a Wan2.1 transformer: {EXPECTED_KEYS}; this file has {len(keys)} keys "
                            f"such as {shown}")


def _to_diffusers_names(tensors: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors under diffusers names, and diffusers name -> the file's name (for messages)."""
    if layout == "diffusers":
        return tensors, {k: k for k in tensors}
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    file_name = {id(t): k for k, t in tensors.items()}
    converted = convert_wan_transformer_to_diffusers(dict(tensors))
    return converted, {k: file_name.get(id(t), k) for k, t in converted.items()}


def _shape_hint(tensors: dict[str, torch.Tensor], config: Mapping[str, Any]) -> str:
    """What model the file holds, next to what the preset wants (a 1.3B or T2V file in a 14B I2V preset)."""
    from pipeline.weight_files.checkpoint_fit import tensor_shape

    def describe(width: object, blocks: int, i2v: bool) -> str:
        return f"width {width}, {blocks} blocks, {'image-to-video' if i2v else 'text-to-video (no image layers)'}"

    patch = tensors.get("patch_embedding.weight")
    width = tensor_shape(patch)[0] if patch is not None else "?"
    blocks = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    i2v = any(k.startswith("condition_embedder.image_embedder.") for k in tensors)
    wanted = describe(config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"],
                      config.get("image_dim") is not None)
    return f"the file holds a transformer of {describe(width, blocks, i2v)}; the preset's config wants {wanted}"


def _write_config(directory: str, config: Mapping[str, Any]) -> str:
    body = {"_class_name": WanTransformer3DModel.__name__, **dict(config)}
    (Path(directory) / "config.json").write_text(json.dumps(body))
    return directory


def _from_gguf(tensors: dict[str, torch.Tensor], config: Mapping[str, Any], compute_dtype: torch.dtype
               ) -> WanTransformer3DModel:
    from diffusers import GGUFQuantizationConfig

    with tempfile.TemporaryDirectory(prefix="particalize-config-") as directory:
        return WanTransformer3DModel.from_single_file(
            tensors, config=_write_config(directory, config), torch_dtype=compute_dtype, local_files_only=True,
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype))


def _dequantize_non_linear_gguf(tensors: dict[str, torch.Tensor], model: torch.nn.Module,
                                compute_dtype: torch.dtype) -> None:
    """diffusers keeps only Linear weights in GGUF blocks; any other quantized tensor is decoded here."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    modules = dict(model.named_modules())
    for key, tensor in list(tensors.items()):
        owner, _, leaf = key.rpartition(".")
        if getattr(tensor, "quant_type", None) is not None and not (
                leaf == "weight" and isinstance(modules.get(owner), torch.nn.Linear)):
            tensors[key] = dequantize_gguf_tensor(tensor).to(compute_dtype)


def keeps_float32(key: str, model: torch.nn.Module) -> bool:
    """diffusers' rule (as its loaders apply `_keep_in_fp32_modules`): any module of that name on the key's path."""
    return any(m in key.split(".") for m in getattr(model, "_keep_in_fp32_modules", None) or [])


def keeps_float8(key: str, model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> bool:
    """Which weights of an fp8 file stay float8 in memory: Linear weights outside the float32 modules."""
    owner, _, leaf = key.rpartition(".")
    return leaf == "weight" and type(modules.get(owner)) is torch.nn.Linear and not keeps_float32(key, model)


def _assign(tensors: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], model: WanTransformer3DModel,
            compute_dtype: torch.dtype) -> WanTransformer3DModel:
    """Assign the tensors to the empty model: float8 Linear weights as Float8Linear, the rest in float32 or the
    compute dtype (see the module docstring)."""
    modules = dict(model.named_modules())
    plain: dict[str, torch.Tensor] = {}
    float8: dict[str, str] = {}
    for key, tensor in tensors.items():
        if tensor.dtype in FLOAT8_DTYPES and keeps_float8(key, model, modules):
            float8[key.rpartition(".")[0]] = key
        else:
            dtype = torch.float32 if keeps_float32(key, model) else compute_dtype
            plain[key] = dequantize(tensor, scales.get(key), dtype)
    model.load_state_dict(plain, strict=False, assign=True)
    for owner, key in float8.items():
        linear = model.get_submodule(owner)
        model.set_submodule(owner, Float8Linear(tensors[key], linear.bias, scales.get(key), compute_dtype))
    return model.eval()


def load_transformer_file(path: Path, config: Mapping[str, Any], compute_dtype: torch.dtype
                          ) -> WanTransformer3DModel:
    """The transformer in `path`, built with `config` (the preset's transformer config), computing in
    `compute_dtype`. WeightsMissing for a missing file; WeightFormatError naming what does not fit."""
    path = Path(path)
    container = container_of(path, "transformer")
    raw = read_checkpoint(path, container)
    tensors, prefixed = strip_prefix(raw, COMFY_PREFIX)
    stored = describe_counts(storage_counts(tensors))
    split = split_scales(tensors)
    layout = _layout(set(split.tensors), prefixed)
    tensors, file_name = _to_diffusers_names(split.tensors, layout)
    scales, _ = _to_diffusers_names(split.scales, layout) if split.scaled else ({}, {})

    empty = empty_transformer(config)
    fit = compare(expected_shapes(empty), tensors)
    if not fit.ok:
        hint = f"{_shape_hint(tensors, config)}: " if fit.misshaped or fit.missing else ""
        raise WeightFormatError(f"{path.name} does not fit the preset's transformer: {hint}{fit.describe(file_name)}. "
                                "Use a transformer file of the preset's model (Wan2.1 I2V 14B for the 480P and 720P "
                                "presets, which have the same shapes)")

    if container == "gguf":
        _dequantize_non_linear_gguf(tensors, empty, compute_dtype)
        model = _from_gguf(tensors, config, compute_dtype)
    else:
        model = _assign(tensors, scales, empty, compute_dtype)

    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightFormatError(f"{path.name}: {len(left)} tensors were not loaded ({', '.join(left[:4])})")
    if model.dtype != compute_dtype:
        raise WeightFormatError(f"{path.name} loaded as {model.dtype}, not the compute dtype {compute_dtype}")
    quantized = sorted(set(quantized_layers(model).values()))
    held = (f"{' and '.join(quantized)} Linear weights{' (scaled)' if split.scaled else ''}, "
            if quantized else "") + f"compute {str(compute_dtype).removeprefix('torch.')}"
    info = LoadedFile("transformer", path, container, layout, stored, held, path.stat().st_size, module_bytes(model))
    attach(model, info)
    log.info("%s", info.describe())
    return model
