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
LAYOUTS = ("diffusers", "original_lora_ab", "original_down_up_alpha", "kohya")


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
    sd: dict[str, torch.Tensor] = {}
    for w in weights:
        if layout == "diffusers":
            # diffusers/PEFT files carry no alpha key: alpha == rank; fold our alpha into B.
            sd[f"transformer.{w.module}.lora_A.weight"] = w.A.clone()
            sd[f"transformer.{w.module}.lora_B.weight"] = (w.B * w.scale).clone()
        elif layout == "original_lora_ab":
            base = f"diffusion_model.{original_name(w.module)}"
            sd[f"{base}.lora_A.weight"] = w.A.clone()
            sd[f"{base}.lora_B.weight"] = (w.B * w.scale).clone()
        elif layout == "original_down_up_alpha":
            base = f"diffusion_model.{original_name(w.module)}"
            sd[f"{base}.lora_down.weight"] = w.A.clone()
            sd[f"{base}.lora_up.weight"] = w.B.clone()
            sd[f"{base}.alpha"] = torch.tensor(w.alpha)
        elif layout == "kohya":
            base = "lora_unet_" + original_name(w.module).replace(".", "_")
            sd[f"{base}.lora_down.weight"] = w.A.clone()
            sd[f"{base}.lora_up.weight"] = w.B.clone()
            sd[f"{base}.alpha"] = torch.tensor(w.alpha)
        else:
            raise ValueError(layout)
    return sd


def write_lora(path: Path, weights: list[LoraWeight], layout: str) -> Path:
    save_file({k: v.contiguous() for k, v in state_dict_for(weights, layout).items()}, str(path))
    return path
