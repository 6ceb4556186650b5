"""Does a LoRA file fit a base, read from its safetensors header and the base's transformer config alone?

A catalogue names LoRA files that the workers only load minutes later (after the base); a file made for another
model (Wan2.1 1.3B, T2V, another family) should stop the start instead, naming itself. The check plans the file's
keys exactly as loading does (pipeline/lora/keys.py's `plan_lora`, onto the base built on the meta device), with
every tensor as an empty meta tensor of its header's shape: no weight is read but the scalar alphas.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import LoraMismatch
from pipeline.lora.keys import LoraPlan, ModelParts, plan_lora

SHOWN_PROBLEMS = 3


def base_parts(transformer_config: Mapping[str, Any]) -> ModelParts:
    """What a LoRA may target in the base the config describes, by every published name (no memory used)."""
    from pipeline.weight_files.transformer_file import empty_transformer

    return ModelParts.of(empty_transformer(transformer_config))


def header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's keys as meta tensors of their shapes (alphas, one number each, read for real); LoraMismatch when
    it is not a readable safetensors file or holds nothing."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = fh.get_slice(key).get_shape()
                numel = 1
                for n in shape:
                    numel *= n
                tensors[key] = fh.get_tensor(key) if numel <= 1 else torch.empty(shape, device="meta")
    except Exception as exc:  # truncated, a pickle, anything that is not safetensors
        raise LoraMismatch(f"cannot read {Path(path).name} as a LoRA (a .safetensors file is needed): {exc}") from exc
    if not tensors:
        raise LoraMismatch(f"{Path(path).name} holds no weights")
    return tensors


def plan_file(path: Path, parts: ModelParts) -> LoraPlan:
    """Where each key of the file would go in the base (`parts`), and the keys that fit nothing."""
    return plan_lora(header_tensors(path), parts)


def misfit(path: Path, parts: ModelParts, strict: bool = True) -> str | None:
    """Why the file would be refused at load (None: it fits): no key fits, or (when `strict`, as
    PARTICALIZE_LORA_STRICT) some key fits nothing; the reason names a few keys and their shapes."""
    try:
        plan = plan_file(path, parts)
    except LoraMismatch as exc:
        return str(exc)
    if not plan.problems:
        return None
    shown = _reasons(plan.problems)
    if not plan.pairs and not plan.deltas:
        return f"no key of {Path(path).name} fits this base ({shown})"
    if strict:
        return f"{len(plan.problems)} of {plan.keys} keys of {Path(path).name} fit nothing in this base ({shown})"
    return None


def _reasons(problems: list[tuple[str, str]]) -> str:
    """The first few distinct reasons, each with its first key and how many more keys it covers (a pair's down,
    up and alpha keys share one)."""
    keys: dict[str, list[str]] = {}
    for key, why in problems:
        keys.setdefault(why, []).append(key)
    parts = [f"{found[0]}{f' and {len(found) - 1} more keys' if len(found) > 1 else ''}: {why}"
             for why, found in list(keys.items())[:SHOWN_PROBLEMS]]
    more = len(keys) - SHOWN_PROBLEMS
    return "; ".join(parts) + (f"; and {more} more reasons" if more > 0 else "")
