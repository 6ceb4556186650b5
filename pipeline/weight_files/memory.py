"""Memory each weight format takes in memory, from the model's parameters on the meta device (no allocation), by the
same rules the single-file loaders hold them by; and which combination fits a GPU at 480P.

Rules (pipeline/weight_files/transformer_file.py, text_encoder_file.py and diffusers' GGUF loader): diffusers' float32
modules (rope, time embedder, modulation tables, norms) stay float32; fp8 keeps every other Linear weight in 1 byte (+ a
4-byte scale per layer when scaled); GGUF keeps every other Linear weight whose rows are a multiple of the format's
block in its blocks. Everything else is in the compute dtype. The fp8 and GGUF figures assume the file quantizes
every Linear weight it may (what ComfyUI's fp8 and city96's GGUF files of Wan2.1 do for the blocks' layers, which
hold 99% of the parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

GIB = 2**30
TRANSFORMER_FORMATS = ("bf16", "fp8", "fp8_scaled", "gguf_Q8_0", "gguf_Q6_K", "gguf_Q5_K", "gguf_Q4_K",
                       "gguf_Q3_K")
"""'bf16' stands for any fp32, bf16 or fp16 file: all are held in the compute dtype."""
LABELS = {"bf16": "bf16 (or fp16/fp32)", "fp8": "fp8 e4m3fn", "fp8_scaled": "ComfyUI fp8 scaled",
          "gguf_Q8_0": "GGUF Q8_0", "gguf_Q6_K": "GGUF Q6_K", "gguf_Q5_K": "GGUF Q5_K", "gguf_Q4_K": "GGUF Q4_K",
          "gguf_Q3_K": "GGUF Q3_K", "cpu": "on the CPU"}
"""A GGUF row counts every quantizable weight in that type (as a *_S file); *_M files keep some layers in a larger
type, so they are somewhat bigger."""
TEXT_ENCODER_FORMATS = ("bf16", "fp8", "fp8_scaled", "cpu")

# 480P activation headroom measured on an H200 (shared/notes/h200-measurements.md, benchmarks/RESULTS.md): peak
# 51.0 GiB with the default configuration minus the 42.0 GiB the parameters took after the build.
HEADROOM_480P_GIB = 51.0 - 42.0
USABLE_GIB = {"24 GB": 23.5, "48 GB": 44.5, "80 GB": 79.0}
"""Memory usable on each card, as in RESULTS.md's table."""

SAFE_MARGIN_GIB = 2.0
"""Left free by a suggested configuration: the headroom was measured with another configuration (bf16, SDPA)."""


def _gguf_block(fmt: str) -> tuple[int, int]:
    import gguf

    return gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, fmt.removeprefix("gguf_"))]


def transformer_bytes_by_format(config: Mapping[str, Any] | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                                formats: tuple[str, ...] = TRANSFORMER_FORMATS) -> dict[str, int]:
    """Bytes the transformer takes held in each format (TRANSFORMER_FORMATS) with `config` (default: Wan2.1 I2V
    14B) and `compute_dtype` (bf16 on CUDA, float32 on CPU), parameters and buffers."""
    from pipeline.random_weights import WAN_I2V_14B_TRANSFORMER
    from pipeline.weight_files.transformer_file import empty_transformer, keeps_float32

    unknown = [f for f in formats if f not in TRANSFORMER_FORMATS]
    if unknown:
        raise ValueError(f"unknown format {unknown[0]!r}: one of {', '.join(TRANSFORMER_FORMATS)}")
    model = empty_transformer(config or WAN_I2V_14B_TRANSFORMER)
    compute = torch.empty((), dtype=compute_dtype).element_size()
    linears = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    params = [(name, p.numel(), p.shape[-1], keeps_float32(name, model), name in linears)
              for name, p in model.named_parameters()]
    sizes = {}
    for fmt in formats:
        block = _gguf_block(fmt) if fmt.startswith("gguf_") else None
        total = buffers
        for _, n, row, fp32, linear in params:
            if fp32:
                total += 4 * n
            elif fmt.startswith("fp8") and linear:
                total += n + (4 if fmt == "fp8_scaled" else 0)
            elif block is not None and linear and row % block[0] == 0:
                total += n // block[0] * block[1]
            else:
                total += n * compute
        sizes[fmt] = total
    return sizes


def transformer_bytes(fmt: str, config: Mapping[str, Any] | None = None,
                      compute_dtype: torch.dtype = torch.bfloat16) -> int:
    return transformer_bytes_by_format(config, compute_dtype, (fmt,))[fmt]


def text_encoder_bytes(fmt: str, config: object | None = None, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes UMT5-XXL (or `config`) takes on the GPU in `fmt` (one of TEXT_ENCODER_FORMATS; 'cpu': none)."""
    from transformers import UMT5Config

    from pipeline.random_weights import UMT5_XXL
    from pipeline.weight_files.quantized_layers import module_bytes
    from pipeline.weight_files.text_encoder_file import empty_text_encoder, keeps_float8

    if fmt not in TEXT_ENCODER_FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {', '.join(TEXT_ENCODER_FORMATS)}")
    if fmt == "cpu":
        return 0
    model = empty_text_encoder(config or UMT5Config(**UMT5_XXL))
    compute = torch.empty((), dtype=compute_dtype).element_size()
    if fmt == "bf16":
        return sum(p.numel() for p in model.parameters()) * compute + module_bytes(model)
    total = module_bytes(model)  # real buffers only (none in UMT5): parameters are on the meta device
    for name, param in model.named_parameters():  # a tied parameter once
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight" and keeps_float8(owner, model.get_submodule(owner)):
            total += param.numel() + (4 if fmt == "fp8_scaled" else 0)
        else:
            total += param.numel() * compute
    return total


def clip_and_vae_bytes(image_encoder_config: Mapping[str, Any] | None = None,
                       vae_config: Mapping[str, Any] | None = None) -> int:
    """The image encoder and the VAE in float32, as the pipeline holds them: a directory's own configs when given,
    else CLIP ViT-H/14 and Wan's VAE."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from pipeline.random_weights import CLIP_VIT_H_14

    clip = CLIPVisionConfig.from_dict(dict(image_encoder_config)) if image_encoder_config else \
        CLIPVisionConfig(**CLIP_VIT_H_14)
    with init_empty_weights():
        vae = AutoencoderKLWan.from_config(dict(vae_config)) if vae_config else AutoencoderKLWan()
        models = [CLIPVisionModel(clip), vae]
    return sum(p.numel() * 4 for m in models for p in m.parameters())


@dataclass(frozen=True)
class Configuration:
    transformer: str
    text_encoder: str
    transformer_gib: float
    text_encoder_gib: float
    clip_vae_gib: float
    headroom_gib: float

    @property
    def peak_gib(self) -> float:
        return self.transformer_gib + self.text_encoder_gib + self.clip_vae_gib + self.headroom_gib

    def fits(self, usable_gib: float) -> bool:
        return self.peak_gib <= usable_gib

    def describe(self) -> str:
        where = ("the text encoder on the CPU" if self.text_encoder == "cpu"
                 else f"a {LABELS.get(self.text_encoder, self.text_encoder)} text encoder")
        return (f"a {LABELS.get(self.transformer, self.transformer)} transformer with {where} "
                f"(≈{self.peak_gib:.1f} GiB at 480P)")

    def settings_hint(self) -> str:
        """What to set for it, for a refusal message (setting names of issue 18)."""
        parts = [] if self.transformer == "bf16" else [
            f"PARTICALIZE_TRANSFORMER_FILE to a {LABELS.get(self.transformer, self.transformer)} transformer file"]
        if self.text_encoder == "cpu":
            parts.append("PARTICALIZE_TEXT_ENCODER_ON_CPU=1")
        elif self.text_encoder != "bf16":
            parts.append(f"PARTICALIZE_TEXT_ENCODER_FILE to a {LABELS.get(self.text_encoder)} UMT5-XXL file")
        return f"set {' and '.join(parts)} (≈{self.peak_gib:.1f} GiB at 480P)" if parts else self.describe()

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_gib": self.peak_gib,
                **{f"fits_{card.replace(' ', '')}": self.fits(gib) for card, gib in USABLE_GIB.items()}}


def configurations_480p(transformer_formats: tuple[str, ...] = TRANSFORMER_FORMATS,
                        text_encoder_formats: tuple[str, ...] = ("bf16", "fp8_scaled", "cpu"),
                        headroom_gib: float = HEADROOM_480P_GIB) -> list[Configuration]:
    """Every transformer x text-encoder combination with its estimated 480P peak on one GPU (bf16 compute)."""
    other = clip_and_vae_bytes() / GIB
    te = {fmt: text_encoder_bytes(fmt) / GIB for fmt in text_encoder_formats}
    rows = []
    for fmt, size in transformer_bytes_by_format(formats=transformer_formats).items():
        rows += [Configuration(fmt, te_fmt, size / GIB, te[te_fmt], other, headroom_gib)
                 for te_fmt in text_encoder_formats]
    return rows


def best_fit(usable_gib: float, rows: list[Configuration] | None = None,
             margin_gib: float = SAFE_MARGIN_GIB) -> Configuration | None:
    """The most precise configuration whose estimate leaves `margin_gib` of `usable_gib` free (the suggestion a
    memory check's refusal names), or None. Transformer precision goes first: a text encoder on the CPU only costs
    the prompt encoding (cached), a coarser transformer costs quality."""
    rows = rows if rows is not None else configurations_480p()
    for row in rows:  # ordered from the most precise transformer; for each, the text encoder on the GPU first
        if row.fits(usable_gib - margin_gib):
            return row
    return None
