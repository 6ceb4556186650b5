"""The Particalize LoRA: find the file, check that it fits, load it as a named adapter, optionally fuse.

diffusers converts every published Wan LoRA layout (diffusers/PEFT, original `diffusion_model.`
with lora_A/B or lora_down/up + alpha, kohya/musubi `lora_unet_`), but it only *warns* about keys
that fit no module. A LoRA that silently does nothing is the worst failure for this product, so
every key is checked against the transformer before loading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import WanImageToVideoPipeline

from pipeline.errors import LoraMismatch, WeightsMissing

log = logging.getLogger(__name__)

ADAPTER_NAME = "particalize"
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


@dataclass(frozen=True)
class LoraInfo:
    path: Path
    modules: int
    rank: int
    strength: float
    fused: bool


def check_lora_fits(state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module) -> tuple[int, int]:
    """Every key must name a Linear of the transformer with matching shapes. Returns (modules, rank)."""
    if not state_dict:
        raise LoraMismatch("the LoRA file holds no LoRA weights")
    modules = dict(transformer.named_modules())
    problems: list[str] = []
    targets: set[str] = set()
    ranks: set[int] = set()
    for key, tensor in state_dict.items():
        name = key.removeprefix("transformer.")
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            problems.append(f"{key}: not a LoRA weight")
            continue
        module_name = name[: -len(suffix)]
        module = modules.get(module_name)
        if not isinstance(module, torch.nn.Linear):
            problems.append(f"{key}: the model has no linear layer {module_name!r}")
            continue
        targets.add(module_name)
        if suffix == ".lora_A.weight":
            ranks.add(tensor.shape[0])
            if tensor.ndim != 2 or tensor.shape[1] != module.in_features:
                problems.append(f"{key}: shape {tuple(tensor.shape)} does not fit in_features {module.in_features}")
        elif suffix == ".lora_B.weight":
            if tensor.ndim != 2 or tensor.shape[0] != module.out_features:
                problems.append(f"{key}: shape {tuple(tensor.shape)} does not fit out_features {module.out_features}")
        elif tensor.shape != (module.out_features,):
            problems.append(f"{key}: bias shape {tuple(tensor.shape)} does not fit {module.out_features}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise LoraMismatch(f"the LoRA does not fit this model ({len(problems)} problems): {shown}")
    return len(targets), max(ranks, default=0)


def load_lora(
    pipe: WanImageToVideoPipeline, path: Path, strength: float = 1.0, fuse: bool = False
) -> LoraInfo:
    """Load `path` under the adapter name 'particalize' at `strength`; fuse into the weights if asked."""
    path = Path(path)
    if not path.is_file():
        raise WeightsMissing(
            f"LoRA file {path} does not exist: set PARTICALIZE_LORA_PATH to a local .safetensors file, or "
            "PARTICALIZE_LORA_REPO and PARTICALIZE_LORA_FILE and run `particalize weights fetch`"
        )
    try:
        state_dict = type(pipe).lora_state_dict(str(path))
    except Exception as exc:  # a corrupt file, a pickle, a layout diffusers cannot convert
        raise LoraMismatch(f"cannot read {path.name} as a Wan LoRA: {exc}") from exc
    state_dict = type(pipe)._maybe_expand_t2v_lora_for_i2v(pipe.transformer, dict(state_dict))
    modules, rank = check_lora_fits(state_dict, pipe.transformer)
    pipe.load_lora_weights(str(path), adapter_name=ADAPTER_NAME)
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[strength])
    if fuse:
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[ADAPTER_NAME])
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    log.info("LoRA %s: %d modules, rank %d, strength %.3g%s", path.name, modules, rank, strength,
             ", fused" if fuse else "")
    return LoraInfo(path=path, modules=modules, rank=rank, strength=strength, fused=fuse)
