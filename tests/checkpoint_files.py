"""Write the tiny transformer and text encoder as single files in the layouts users have: Wan's original key names
(optionally under ComfyUI's `model.diffusion_model.` prefix), fp32/bf16/fp16, fp8, ComfyUI's scaled fp8 (both
conventions), and GGUF written with the `gguf` package (city96's layout: original Wan names).

The original names come from the tiny diffusers state dict by `to_original_names`, which inverts diffusers' key
mapping and checks itself against diffusers' own converter (`convert_wan_transformer_to_diffusers`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

COMFY_PREFIX = "model.diffusion_model."
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}

# diffusers substring -> original Wan substring, applied in this order.
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
]


def original_name(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    key = re.sub(r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation", key)
    key = re.sub(r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3.", key)  # diffusers' norm2 is Wan's norm3
    for diffusers, original in _TO_ORIGINAL:
        key = key.replace(diffusers, original)
    return key


def to_original_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusers-named state dict under Wan's original names; asserts diffusers maps it back exactly."""
    original = {original_name(k): v for k, v in state_dict.items()}
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(state_dict), sorted(set(back) ^ set(state_dict))
    assert all(back[k] is state_dict[k] for k in state_dict)
    return original


def linear_weights(model: torch.nn.Module) -> set[str]:
    """diffusers names of every Linear weight (what fp8 files store in float8, and GGUF files quantize)."""
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def transformer_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in transformer.state_dict().items()}


def _save(path: Path, state_dict: dict[str, torch.Tensor], prefix: str = "") -> Path:
    save_file({prefix + k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def write_transformer(path: Path, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                      layout: str = "original") -> Path:
    """Every tensor in `dtype`, in `layout`: 'original', 'comfyui' (original + prefix) or 'diffusers'."""
    sd = {k: v.to(dtype) for k, v in state.items()}
    if layout == "diffusers":
        return _save(path, sd)
    return _save(path, to_original_names(sd), COMFY_PREFIX if layout == "comfyui" else "")


def fp8_state(state: dict[str, torch.Tensor], float8_keys: set[str], fp8: torch.dtype = torch.float8_e4m3fn,
              scaled: str | None = None, rest: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """As ComfyUI writes fp8 files: Linear weights in float8, the rest in bf16. `scaled`: 'scale_weight' (the
    `scaled_fp8` files: marker + `<layer>.scale_weight`) or 'weight_scale' (the newer files, + `comfy_quant`)."""
    sd: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in float8_keys:
            sd[key] = value.to(rest)
            continue
        if scaled is None:
            sd[key] = value.to(fp8)
            continue
        scale = (value.abs().max().float() / FP8_MAX[fp8]).clamp(min=1e-12)
        sd[key] = (value.float() / scale).to(fp8)
        layer = key.removesuffix(".weight")
        sd[f"{layer}.{scaled}"] = scale.reshape(())
        if scaled == "weight_scale":
            sd[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            sd[f"{layer}.input_scale"] = torch.tensor(1.0)
    if scaled == "scale_weight":
        sd["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return sd


def write_fp8_transformer(path: Path, state: dict[str, torch.Tensor], float8_keys: set[str], *,
                          fp8: torch.dtype = torch.float8_e4m3fn, scaled: str | None = None,
                          prefix: bool = True) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ComfyUI-style fp8 file (original names, with the prefix unless told); also its diffusers-named tensors."""
    sd = fp8_state(state, float8_keys, fp8, scaled)
    weights = {k: v for k, v in sd.items() if k in state}
    extra = {k: v for k, v in sd.items() if k not in state}
    original = to_original_names(weights)
    for key, value in extra.items():  # scale keys follow their weight's name
        layer, _, leaf = key.rpartition(".")
        original[f"{original_name(layer + '.weight').removesuffix('.weight')}.{leaf}" if layer else key] = value
    _save(path, original, COMFY_PREFIX if prefix else "")
    return path, sd


def dequantized_fp8(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """What an fp8 file's weight stands for: float8 -> float32, times its scale when it has one."""
    layer = key.removesuffix(".weight")
    scale = sd.get(f"{layer}.scale_weight", sd.get(f"{layer}.weight_scale"))
    value = sd[key].to(torch.float32)
    return value * scale.to(torch.float32) if scale is not None else value


def write_gguf(path: Path, state: dict[str, torch.Tensor], quantize_keys: set[str], qtype_name: str = "Q8_0"
               ) -> Path:
    """A GGUF file as city96's Wan files are: original names, the chosen weights quantized, the rest F32."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    to_original_names(state)  # the names below map back exactly
    writer = gguf.GGUFWriter(str(path), arch="wan")
    for key, value in state.items():
        data = value.to(torch.float32).numpy()
        if key in quantize_keys and data.shape[-1] % block == 0:
            writer.add_tensor(original_name(key), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(original_name(key), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_quantized_keys(state: dict[str, torch.Tensor], linear: set[str], keep_fp32: list[str],
                        block: int = 32) -> set[str]:
    """The Linear weights a GGUF file can hold in blocks (rows a multiple of the block size) that diffusers keeps
    quantized (not in the model's keep-in-fp32 modules)."""
    return {k for k in linear if state[k].shape[-1] % block == 0
            and not any(m in k.split(".") for m in keep_fp32)}


def write_text_encoder(path: Path, text_encoder: torch.nn.Module, dtype: torch.dtype = torch.bfloat16,
                       scaled: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """The UMT5 encoder as ComfyUI's umt5 files have it: transformers' names, no tied `encoder.embed_tokens`;
    `scaled`: its Linear weights as ComfyUI's fp8 scaled file (marker + scale_weight), the rest bf16."""
    state = {k: v.detach().clone() for k, v in text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if scaled:
        sd = fp8_state(state, linear_weights(text_encoder) & set(state), scaled="scale_weight")
    else:
        sd = {k: v.to(dtype) for k, v in state.items()}
    _save(path, sd)
    return path, sd


def used_weight(model: torch.nn.Module, key: str) -> torch.Tensor:
    """The value a parameter computes with: a float8 or GGUF layer's weight dequantized, else the parameter."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    from pipeline.weight_files.quantized_layers import Float8Linear, is_gguf_linear

    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    module = getattr(module, "base_layer", module)
    if leaf == "weight" and isinstance(module, Float8Linear):
        return module.dequantized_weight().detach()
    if leaf == "weight" and is_gguf_linear(module):
        return dequantize_gguf_tensor(module.weight).to(module.compute_dtype)
    return getattr(module, leaf).detach()
