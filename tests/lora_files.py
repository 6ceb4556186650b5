"""Build small LoRA files for the tiny transformer in every key layout Wan LoRAs are published in.

One canonical set of (module, A, B, alpha) is written out under each layout, so a test can compute
the expected effective weight W + s * (alpha / r) * B @ A by hand and compare it with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# diffusers module name -> original Wan name (self_attn/cross_attn/ffn) and kohya/musubi name part.
_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
LAYOUTS = ("diffusers", "peft_bare", "original_lora_ab", "original_down_up", "original_down_up_alpha", "kohya",
           "kohya_lora_ab", "kohya_no_alpha")


@dataclass(frozen=True)
class LoraWeight:
    module: str  # diffusers name inside the transformer, e.g. "blocks.0.attn1.to_q"
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.A.shape[0]


def original_name(module: str) -> str:
    _, i, part, *rest = module.split(".")
    tail = ".".join(rest)
    if part == "attn1":
        return f"blocks.{i}.self_attn.{_ATTN[tail]}"
    if part == "attn2":
        name = {"add_k_proj": "k_img", "add_v_proj": "v_img"}.get(tail) or _ATTN[tail]
        return f"blocks.{i}.cross_attn.{name}"
    if part == "ffn":
        return f"blocks.{i}.ffn.{'0' if tail == 'net.0.proj' else '2'}"
    raise ValueError(module)


def target_modules(transformer: torch.nn.Module) -> list[str]:
    """Every module a full Wan I2V LoRA trains: self/cross attention incl. k_img/v_img, and the FFN."""
    names = []
    for i in range(len(transformer.blocks)):
        names += [f"blocks.{i}.attn1.{t}" for t in _ATTN]
        names += [f"blocks.{i}.attn2.{t}" for t in (*_ATTN, "add_k_proj", "add_v_proj")]
        names += [f"blocks.{i}.ffn.net.0.proj", f"blocks.{i}.ffn.net.2"]
    return names


def make_weights(transformer: torch.nn.Module, rank: int = 4, alpha: float = 2.0, seed: int = 7,
                 magnitude: float = 0.3) -> list[LoraWeight]:
    gen = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    out = []
    for name in target_modules(transformer):
        linear = modules[name]
        a = torch.randn(rank, linear.in_features, generator=gen) * magnitude
        b = torch.randn(linear.out_features, rank, generator=gen) * magnitude
        out.append(LoraWeight(name, a, b, alpha))
    return out


def state_dict_for(weights: list[LoraWeight], layout: str) -> dict[str, torch.Tensor]:
    """Files without an alpha key have scale 1: our alpha / rank is folded into B for them."""
    sd: dict[str, torch.Tensor] = {}
    for w in weights:
        if layout in ("diffusers", "peft_bare"):
            prefix = "transformer." if layout == "diffusers" else ""
            sd[f"{prefix}{w.module}.lora_A.weight"] = w.A.clone()
            sd[f"{prefix}{w.module}.lora_B.weight"] = (w.B * w.scale).clone()
        elif layout in ("original_lora_ab", "original_down_up"):
            base = f"diffusion_model.{original_name(w.module)}"
            down, up = ("lora_A", "lora_B") if layout == "original_lora_ab" else ("lora_down", "lora_up")
            sd[f"{base}.{down}.weight"] = w.A.clone()
            sd[f"{base}.{up}.weight"] = (w.B * w.scale).clone()
        elif layout == "original_down_up_alpha":
            base = f"diffusion_model.{original_name(w.module)}"
            sd[f"{base}.lora_down.weight"] = w.A.clone()
            sd[f"{base}.lora_up.weight"] = w.B.clone()
            sd[f"{base}.alpha"] = torch.tensor(w.alpha)
        elif layout in ("kohya", "kohya_lora_ab"):
            base = "lora_unet_" + original_name(w.module).replace(".", "_")
            down, up = ("lora_A", "lora_B") if layout == "kohya_lora_ab" else ("lora_down", "lora_up")
            sd[f"{base}.{down}.weight"] = w.A.clone()
            sd[f"{base}.{up}.weight"] = w.B.clone()
            sd[f"{base}.alpha"] = torch.tensor(w.alpha)
        elif layout == "kohya_no_alpha":
            base = "lora_unet_" + original_name(w.module).replace(".", "_")
            sd[f"{base}.lora_down.weight"] = w.A.clone()
            sd[f"{base}.lora_up.weight"] = (w.B * w.scale).clone()
        else:
            raise ValueError(layout)
    return sd


def write_lora(path: Path, weights: list[LoraWeight], layout: str,
               diffs: list[LoraDiff] | None = None) -> Path:
    sd = state_dict_for(weights, layout)
    sd.update({d.key: d.value.clone() for d in diffs or []})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@dataclass(frozen=True)
class LoraDiff:
    """A full difference as lightx2v's files carry them: `key` in Wan's original names, `param` in diffusers'."""

    key: str
    param: str
    value: torch.Tensor


# (original name, diffusers name) of the parts a step-distill file changes by difference, besides the Linears.
_BLOCK_DIFFS = [
    ("self_attn.norm_q.diff", "attn1.norm_q.weight"), ("self_attn.norm_k.diff", "attn1.norm_k.weight"),
    ("cross_attn.norm_q.diff", "attn2.norm_q.weight"), ("cross_attn.norm_k.diff", "attn2.norm_k.weight"),
    ("cross_attn.norm_k_img.diff", "attn2.norm_added_k.weight"),
    ("norm3.diff", "norm2.weight"), ("norm3.diff_b", "norm2.bias"), ("diff_m", "scale_shift_table"),
]
_TOP_DIFFS = [
    ("head.diff_m", "scale_shift_table"), ("head.head.diff_b", "proj_out.bias"),
    ("patch_embedding.diff", "patch_embedding.weight"), ("patch_embedding.diff_b", "patch_embedding.bias"),
    ("img_emb.proj.0.diff", "condition_embedder.image_embedder.norm1.weight"),
    ("img_emb.proj.0.diff_b", "condition_embedder.image_embedder.norm1.bias"),
    ("img_emb.proj.1.diff", "condition_embedder.image_embedder.ff.net.0.proj.weight"),
    ("img_emb.proj.1.diff_b", "condition_embedder.image_embedder.ff.net.0.proj.bias"),
    ("img_emb.proj.3.diff", "condition_embedder.image_embedder.ff.net.2.weight"),
    ("img_emb.proj.3.diff_b", "condition_embedder.image_embedder.ff.net.2.bias"),
    ("img_emb.proj.4.diff", "condition_embedder.image_embedder.norm2.weight"),
    ("img_emb.proj.4.diff_b", "condition_embedder.image_embedder.norm2.bias"),
    ("text_embedding.0.diff_b", "condition_embedder.text_embedder.linear_1.bias"),
    ("time_projection.1.diff_b", "condition_embedder.time_proj.bias"),
]


def make_diffs(transformer: torch.nn.Module, seed: int = 8, magnitude: float = 0.05) -> list[LoraDiff]:
    """Every kind of difference a lightx2v-style step-distill file carries: diff_b on every Linear a block LoRA
    trains, diff on the q/k/k_img norms and on norm3, diff_m on each modulation table and the head's, img_emb,
    patch embedding, embedders."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(transformer.named_parameters())
    named = []
    for module in target_modules(transformer):
        named.append((f"{original_name(module)}.diff_b", f"{module}.bias"))
    for i in range(len(transformer.blocks)):
        named += [(f"blocks.{i}.{key}", f"blocks.{i}.{param}") for key, param in _BLOCK_DIFFS]
    named += _TOP_DIFFS
    return [LoraDiff(f"diffusion_model.{key}", param,
                     torch.randn(params[param].shape, generator=gen) * magnitude) for key, param in named]
