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
from pipeline.lora.removal import delta_refusal, unwrap_bare_layers
from pipeline.lora.stack import SHOWN_PROBLEMS, LoraInfo, LoraStack, read_lora_file


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
