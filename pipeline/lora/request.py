"""LoRAs sent with one request: checked against the base before the run, loaded on top of the run's tool, dropped
after it, leaving the model exactly as it was (a following run without them is bit-equal to a fresh process's).

Loading is `LoraStack.load(..., request=True)` (always strict); dropping is `LoraStack.drop`: the adapters are
deleted, their full differences taken out (pipeline/lora/diffs.py rewrites each weight from its original), and a
layer PEFT wrapped only for them gets its own Linear back (`unwrap_bare_layers`), so the module tree is the one the
warm (and compiled) model had. Full differences on a quantized layer are refused: loading them would dequantize that
layer for good (pipeline/weight_files/quantized_layers.unquantize), and the next run would not be the fresh one's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.errors import LoraMismatch
from pipeline.lora.keys import ModelParts, plan_lora
from pipeline.lora.stack import SHOWN_PROBLEMS, LoraInfo, LoraStack, read_lora_file
from pipeline.weight_files.quantized_layers import FLOAT8_DTYPES, is_quantized_linear


def check_lora_file(transformer: torch.nn.Module, path: Path) -> None:
    """LoraMismatch unless every key of the file fits this transformer (names and shapes, in any published layout);
    nothing is loaded. The same plan `LoraStack.load` makes, so a file that passes here loads."""
    plan = plan_lora(read_lora_file(path), ModelParts.of(transformer))
    if plan.problems:
        shown = "; ".join(f"{key}: {why}" for key, why in plan.problems[:SHOWN_PROBLEMS])
        more = len(plan.problems) - SHOWN_PROBLEMS
        raise LoraMismatch(f"it is not a LoRA for this model: {len(plan.problems)} of {plan.keys} keys do not fit "
                           f"it ({shown}{f'; and {more} more' if more > 0 else ''}); send a LoRA made for Wan2.1 "
                           "I2V 14B")
    if not plan.pairs and not plan.deltas:
        raise LoraMismatch("it holds no LoRA weights for this model")
    refusal = delta_refusal(transformer, plan.deltas)
    if refusal:
        raise LoraMismatch(refusal)


def delta_refusal(transformer: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> str | None:
    """Why a request LoRA's full differences cannot be switched on and off on this transformer (they touch a
    quantized weight), or None."""
    for name in deltas:
        owner, _, leaf = name.rpartition(".")
        module = transformer.get_submodule(owner) if owner else transformer
        base = getattr(module, "base_layer", module)
        param = getattr(base, leaf, None)
        quantized = is_quantized_linear(base) or (
            isinstance(param, torch.Tensor) and (param.dtype in FLOAT8_DTYPES or type(param.data) is not torch.Tensor))
        if quantized:
            return (f"it changes {name} by a full difference, and that weight is quantized on this server: a "
                    "request LoRA may change quantized layers by LoRA pairs only")
    return None


def unwrap_bare_layers(transformer: torch.nn.Module) -> list[str]:
    """Give every LoRA wrapper that holds no adapter any more its own layer back (PEFT keeps the wrapper after
    deleting its last adapter); the names of the layers unwrapped."""
    from peft.tuners.lora import LoraLayer

    bare = [name for name, module in transformer.named_modules()
            if isinstance(module, LoraLayer) and not any(getattr(module, attr) for attr in module.adapter_layer_names)]
    for name in bare:
        transformer.set_submodule(name, transformer.get_submodule(name).get_base_layer())
    return bare


@contextmanager
def request_loras(stack: LoraStack, files: Sequence[tuple[Path, float]]) -> Iterator[list[LoraInfo]]:
    """The request's LoRAs loaded (active in every run) for the block's length, then dropped, also when loading one
    of them or the run fails."""
    loaded: list[LoraInfo] = []
    try:
        for path, strength in files:
            loaded.append(stack.load(path, strength, request=True))
        yield loaded
    finally:
        stack.drop(loaded)
        transformer = stack.pipe.transformer
        known = {info.name for info in stack.loras}
        stray = [name for name in getattr(transformer, "peft_config", {}) if name not in known]
        if stray:  # a load that failed half-way (diffusers raised with the adapter in place)
            transformer.delete_adapters(stray)
        unwrap_bare_layers(transformer)  # a strict load that failed deleted its adapter, not its wrappers
