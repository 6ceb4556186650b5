"""The UMT5-XXL text encoder from one .safetensors file as users have it: transformers' T5 key names
(`shared.weight`, `encoder.block.N.layer...`), as in google/umt5-xxl and ComfyUI's umt5_xxl files; bf16/fp16/fp32,
fp8, or ComfyUI's fp8 scaled file.

Built with the preset's UMT5Config (passed in). Float8 Linear weights stay float8 (Float8Linear), except T5's `wo`
projections and the embedding: T5 casts the input of `wo` to that layer's weight dtype, and transformers reads the
model's dtype from its first parameter (the shared embedding), so those two stay in the compute dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import UMT5Config, UMT5EncoderModel

from pipeline.errors import WeightFormatError
from pipeline.weight_files.checkpoint_fit import compare, expected_shapes
from pipeline.weight_files.checkpoint_read import container_of, describe_counts, read_checkpoint, storage_counts
from pipeline.weight_files.loaded_file import LoadedFile, attach
from pipeline.weight_files.quantized_layers import FLOAT8_DTYPES, Float8Linear, module_bytes
from pipeline.weight_files.scaled_fp8 import dequantize, split_scales

log = logging.getLogger(__name__)

TIED = "encoder.embed_tokens.weight"
SHARED = "shared.weight"
NOT_ENCODER = ("decoder.", "lm_head.")
"""A full T5 checkpoint's other half: the encoder-only model has no use for it."""
TOKENIZER_KEY = "spiece_model"
"""ComfyUI's text encoder files may carry the SentencePiece tokenizer as bytes; the preset's tokenizer is used."""


def keeps_float8(name: str, module: torch.nn.Module) -> bool:
    """Which text-encoder layers a float8 file's weights stay float8 in (see the module docstring)."""
    return type(module) is torch.nn.Linear and not name.endswith(".wo")


def empty_text_encoder(config: UMT5Config) -> UMT5EncoderModel:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = UMT5EncoderModel(config)
    model.tie_weights()  # encoder.embed_tokens is the shared embedding, as in a model built normally
    return model


def load_text_encoder_file(path: Path, config: UMT5Config, compute_dtype: torch.dtype) -> UMT5EncoderModel:
    """The UMT5 encoder in `path` with `config`, computing in `compute_dtype`; WeightFormatError naming the keys
    that do not fit (a T5 that is not UMT5, another size)."""
    path = Path(path)
    container = container_of(path, "text encoder")
    if container != "safetensors":
        raise WeightFormatError(f"{path.name}: a text encoder is read from .safetensors only (GGUF text encoders "
                                "are not supported)")
    raw = read_checkpoint(path, container)
    stored = describe_counts(storage_counts(raw))
    split = split_scales({k: v for k, v in raw.items() if not k.startswith(NOT_ENCODER) and k != TOKENIZER_KEY})
    tensors, scales = split.tensors, split.scales
    if SHARED not in tensors and TIED in tensors:
        tensors[SHARED] = tensors[TIED]
        if TIED in scales:
            scales[SHARED] = scales[TIED]
    tensors.pop(TIED, None)

    model = empty_text_encoder(config)
    expected = {k: v for k, v in expected_shapes(model).items() if k != TIED}
    fit = compare(expected, tensors)
    if not fit.ok:
        raise WeightFormatError(
            f"{path.name} does not fit the preset's UMT5 text encoder: {fit.describe()}. A UMT5-XXL encoder file "
            f"has keys {SHARED}, encoder.block.N.layer.0.SelfAttention.q.weight, ... (transformers' T5 names) "
            "with a relative attention bias in every block")

    modules = dict(model.named_modules())
    plain, float8 = {}, {}
    for key, tensor in tensors.items():
        owner, _, leaf = key.rpartition(".")
        if tensor.dtype in FLOAT8_DTYPES and leaf == "weight" and keeps_float8(owner, modules.get(owner)):
            float8[owner] = key
        else:
            plain[key] = dequantize(tensor, scales.get(key), compute_dtype)
    model.load_state_dict(plain, strict=False, assign=True)
    model.tie_weights()  # encoder.embed_tokens is the shared embedding again
    for owner, key in float8.items():
        linear = model.get_submodule(owner)
        model.set_submodule(owner, Float8Linear(tensors[key], linear.bias, scales.get(key), compute_dtype))
    model.eval()

    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightFormatError(f"{path.name}: {len(left)} tensors were not loaded ({', '.join(left[:4])})")
    if model.dtype != compute_dtype:
        raise WeightFormatError(f"{path.name} loaded as {model.dtype}, not the compute dtype {compute_dtype}")
    kinds = sorted({str(tensors[k].dtype).removeprefix("torch.") for k in float8.values()})
    held = (f"{' and '.join(kinds)} Linear weights{' (scaled)' if split.scaled else ''}, " if kinds else "") + \
        f"compute {str(compute_dtype).removeprefix('torch.')}"
    info = LoadedFile("text_encoder", path, container, "transformers UMT5", stored, held, path.stat().st_size,
                      module_bytes(model))
    attach(model, info)
    log.info("%s", info.describe())
    return model
