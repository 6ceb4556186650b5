"""LoRAs on the transformer: every key of a file applied or the file refused; several at once; a switchable speed LoRA.

Which path each kind of key takes (the plan is made from the file's own keys, see pipeline/lora/keys.py):

- LoRA pairs on Linear layers (attention q/k/v/o, k_img/v_img, FFN, embedders, head), with or without alpha:
  diffusers/PEFT, one adapter per file; the keys are handed over in diffusers names, alpha / rank folded into lora_B.
- `diff` (norms, patch embedding, img_emb, any weight), `diff_b` (biases), `diff_m` (modulation tables), PEFT
  `lora_B.bias`, and pairs on layers that are not Linear: pipeline/lora/diffs.py, switched with the same strengths.

On a quantized base (float8 or GGUF transformer files, pipeline/weight_files/quantized_layers.py) pairs stay unfused
adapters in the compute dtype on top of the quantized layers (exact); a full difference on a quantized weight makes
that one layer a plain Linear holding its dequantized weight (exact); fusing into quantized weights is refused
(LoraFuseRefused): it would round the LoRA's change away, or is not possible for GGUF blocks.

After diffusers has loaded a file, each pair is looked up again in the layer it wraps (the adapter's lora_A and
lora_B must hold the file's values): a key that changed nothing is refused by name, or, with
`strict=False` (PARTICALIZE_LORA_STRICT=false), left out and counted in a WARNING.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import WanImageToVideoPipeline

from pipeline.errors import LoraFuseRefused, LoraMismatch, WeightsMissing
from pipeline.lora.diffs import WeightDiffs
from pipeline.lora.keys import LoraPlan, ModelParts, plan_lora
from pipeline.lora.removal import delta_refusal, unwrap_bare_layers
from pipeline.weight_files.quantized_layers import quantized_layers, unquantize

log = logging.getLogger(__name__)

SHOWN_PROBLEMS = 5


@dataclass(frozen=True)
class LoraStackOptions:
    """The LoRAs a generator loads, as files on disk (the entry points find them: weights.locate)."""

    loras: tuple[tuple[Path, float], ...] = ()
    """(file, strength) in order: the Particalize LoRA first, then any stacked after it."""
    speed_lora: tuple[Path, float] | None = None
    """Fast mode's step-distilled LoRA: loaded last, active only in fast mode."""
    tools: tuple[tuple[str, tuple[tuple[Path, float], ...]], ...] = ()
    """Further tools' stacks (tool name, its (file, strength) in order): each loaded once as adapters of its own, and
    active instead of `loras` while a run asks for that tool. With any, nothing is fused: a fused stack could not
    be switched off."""
    fuse: bool = False
    """Fuse the stack into the weights at load (no per-step LoRA cost); the speed LoRA stays an adapter."""
    strict: bool = True
    """Refuse a file any key of which changes nothing (False: load what fits, log the rest)."""


@dataclass(frozen=True)
class LoraInfo:
    name: str
    """Its adapter name."""
    path: Path
    strength: float
    modules: int
    """Linear layers it wraps with a LoRA pair."""
    diffs: int
    """Parameters it changes by a full difference (diff, diff_b, diff_m)."""
    rank: int
    keys: int
    """Keys in the file."""
    skipped: int = 0
    """Keys left out (only with strict=False)."""
    fused: bool = False
    speed: bool = False
    """The fast mode's step-distilled LoRA: active only in fast mode."""
    tool: str = ""
    """The tool whose stack it is part of ("": the default stack); active only in that tool's runs."""
    request: bool = False
    """Sent with one request (pipeline.lora.request): active in that run whatever its tool, then dropped."""

    def describe(self) -> str:
        parts = [f"{self.path.name} as {self.name!r}", f"strength {self.strength:g}",
                 f"{self.modules} layers rank {self.rank}", f"{self.diffs} differences"]
        if self.skipped:
            parts.append(f"{self.skipped} of {self.keys} keys NOT applied")
        if self.fused:
            parts.append("fused")
        if self.speed:
            parts.append("fast mode only")
        if self.tool:
            parts.append(f"tool {self.tool}")
        if self.request:
            parts.append("this request only")
        return ", ".join(parts)


def _problem_text(problems: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{key}: {why}" for key, why in problems[:SHOWN_PROBLEMS])
    more = len(problems) - SHOWN_PROBLEMS
    return shown + (f"; and {more} more" if more > 0 else "")


def _adapter_name(path: Path, speed: bool, taken: Iterable[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:48] or "lora"
    base = f"speed_{base}" if speed else base
    name, n = base, 2
    while name in set(taken):
        name, n = f"{base}_{n}", n + 1
    return name


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """The file's own keys and tensors, before any conversion; LoraMismatch when it is not a safetensors file."""
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(path))
    except Exception as exc:  # a corrupt file, a pickle, anything that is not safetensors
        raise LoraMismatch(f"cannot read {path.name} as a LoRA (a .safetensors file is needed): {exc}") from exc
    if not state_dict:
        raise LoraMismatch(f"{path.name} holds no weights")
    return state_dict


class LoraStack:
    """The LoRAs loaded into one pipeline, each under its own adapter name, and which of them are active."""

    def __init__(self, pipe: WanImageToVideoPipeline, strict: bool = True) -> None:
        self.pipe = pipe
        self.strict = strict
        self.loras: list[LoraInfo] = []
        self.diffs = WeightDiffs(pipe.transformer)
        self.fast: bool | None = None
        """The mode last applied (None: not yet)."""
        self.tool = ""
        """The tool whose stack was last applied."""

    @property
    def has_speed(self) -> bool:
        return any(info.speed for info in self.loras)

    def switched_parameters(self) -> set[str]:
        """Parameters that unfused LoRAs change by a full difference, rewritten in place when modes switch."""
        return {name for info in self.loras if not info.fused for name in self.diffs.names(info.name)}

    @property
    def tools(self) -> set[str]:
        """The tools whose stacks are loaded ("" the default one, always)."""
        return {""} | {info.tool for info in self.loras}

    def load(self, path: Path, strength: float = 1.0, *, speed: bool = False,
             state_dict: dict[str, torch.Tensor] | None = None, tool: str = "", request: bool = False) -> LoraInfo:
        """Load one file as a new adapter (active at `strength` now unless it is the speed LoRA or another tool's).
        `state_dict`: the file's keys already in memory, on any device (benchmarks build them in code); `path` then
        names it. `request`: a LoRA sent with one request, active in every run until `drop` (always strict: a key
        that changes nothing refuses it)."""
        path = Path(path)
        if state_dict is None and not path.is_file():
            raise WeightsMissing(
                f"LoRA file {path} does not exist: set PARTICALIZE_LORA_PATH or PARTICALIZE_LORAS to a local "
                ".safetensors file, or a hub file and run `particalize weights fetch`"
            )
        state_dict = read_lora_file(path) if state_dict is None else state_dict
        strict = self.strict or request
        stem = f"request_{path.stem}" if request else f"{tool}_{path.stem}" if tool else ""
        name = _adapter_name(Path(stem) if stem else path, speed, (info.name for info in self.loras))
        plan = plan_lora(state_dict, ModelParts.of(self.pipe.transformer))
        self._check(plan, path, "", strict)
        if not plan.pairs and not plan.deltas:
            raise LoraMismatch(f"no key of {path.name} fits this model: {_problem_text(plan.problems)}")
        if request:
            refusal = delta_refusal(self.pipe.transformer, plan.deltas)
            if refusal:
                raise LoraMismatch(f"{path.name}: {refusal}")
        dequantized = unquantize(self.pipe.transformer, plan.deltas)
        if dequantized:
            log.info("LoRA %s changes %d quantized layers by full differences: those layers now hold their "
                     "dequantized weights (exact)", path.name, len(dequantized))
        if plan.pairs:
            with warnings.catch_warnings():  # PEFT warns that a second adapter is a second adapter: that is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.pipe.load_lora_weights(_diffusers_state_dict(plan), adapter_name=name)
            missed = _pairs_not_loaded(self.pipe.transformer, plan, name)
            if missed:
                plan.drop(missed, "diffusers did not load it into the layer")
                if strict:
                    self.pipe.delete_adapters(name)
                self._check(plan, path, " after loading", strict)
        if plan.deltas:
            self.diffs.add(name, plan.deltas, 0.0)
        info = LoraInfo(name, path, strength, modules=len(plan.pairs), diffs=len(plan.deltas), rank=plan.rank,
                        keys=plan.keys, skipped=len(plan.problems), speed=speed, tool=tool, request=request)
        self.loras.append(info)
        fast, self.fast = bool(self.fast), None  # loading made diffusers activate the new adapter alone
        self.use(fast, self.tool)
        log.info("LoRA %s", info.describe())
        return info

    def _check(self, plan: LoraPlan, path: Path, when: str, strict: bool) -> None:
        if not plan.problems:
            return
        text = _problem_text(plan.problems)
        if strict:
            raise LoraMismatch(
                f"{path.name} does not fit this model{when}: {len(plan.problems)} of {plan.keys} keys would change "
                f"nothing ({text}). Use a LoRA made for Wan2.1 I2V 14B, or set PARTICALIZE_LORA_STRICT=false to "
                "load the keys that fit."
            )
        log.warning("LoRA %s: %d of %d keys NOT applied%s (lora_strict is off): %s", path.name,
                    len(plan.problems), plan.keys, when, text)

    def fuse(self) -> None:
        """Fuse every LoRA loaded so far into the weights at its strength (no per-step LoRA cost). Load the speed
        LoRA after this: it stays an adapter, switched per request (PEFT cannot mix fused and unfused adapters)."""
        if self.has_speed:
            raise RuntimeError("fuse the LoRA stack before loading the speed LoRA")
        todo = [info for info in self.loras if not info.fused]
        if not todo:
            return
        adapters = [info.name for info in todo if info.modules]
        refusal = self.fuse_refusal()
        if refusal:
            raise LoraFuseRefused(refusal)
        self.use(False)
        if adapters:
            self.pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=adapters)
            self.pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
        self.diffs.fold([info.name for info in todo])
        self.loras = [replace(info, fused=True) if info in todo else info for info in self.loras]
        self.fast = None

    def fuse_refusal(self) -> str | None:
        """Why `fuse` would be refused for the LoRAs loaded so far (their layers are quantized), or None."""
        adapters = [info.name for info in self.loras if info.modules and not info.fused]
        return fuse_refusal(self.pipe.transformer, adapters)

    def use(self, fast: bool, tool: str = "") -> None:
        """Activate `tool`'s stack (and only it), plus the speed LoRA when `fast`; nothing is done when that is
        already so. Switching tools only sets adapter weights (diffusers' set_adapters) and rewrites the full
        differences from their originals: nothing is loaded again, and no value drifts."""
        if fast and not self.has_speed:
            raise ValueError("fast mode needs a speed LoRA (PARTICALIZE_SPEED_LORA), and none is loaded")
        if tool not in self.tools:
            raise LoraMismatch(f"the LoRAs of tool {tool} are not loaded in this worker (it has "
                               f"{', '.join(sorted(t for t in self.tools if t)) or 'no other tool'}): restart it "
                               "with the catalogue that names the tool")
        if self.fast == fast and self.tool == tool:
            return
        active = [info for info in self.loras if not info.fused and (fast or not info.speed) and (
            info.request or (info.speed if info.speed else info.tool == tool))]
        adapters = [info for info in active if info.modules]
        if adapters:
            self.pipe.enable_lora()
            self.pipe.set_adapters([info.name for info in adapters], adapter_weights=[i.strength for i in adapters])
        elif any(info.modules and not info.fused for info in self.loras):
            self.pipe.disable_lora()
        self.diffs.set_weights({info.name: info.strength for info in active})
        self.fast, self.tool = fast, tool

    def drop(self, infos: Iterable[LoraInfo]) -> None:
        """Unload request LoRAs (`load(..., request=True)`): their adapters deleted, their full differences taken
        out (the weights rewritten from their originals), and every layer left without an adapter given back its
        own Linear, so that the model is again what it was before they were loaded."""
        gone = [info for info in infos if info in self.loras]
        if not gone:
            return
        adapters = [info.name for info in gone if info.modules]
        if adapters:
            self.pipe.transformer.delete_adapters(adapters)
        for info in gone:
            self.diffs.remove(info.name)
        unwrap_bare_layers(self.pipe.transformer)
        self.loras = [info for info in self.loras if info not in gone]
        fast, self.fast = bool(self.fast), None
        self.use(fast, self.tool)


def fuse_refusal(transformer: torch.nn.Module, adapters: Iterable[str] | None = None) -> str | None:
    """Why these adapters (None: any LoRA) cannot be fused into this transformer, or None when they can: their
    layers' base weights are quantized. Callers that fuse by default (before compiling) check this first."""
    wanted = None if adapters is None else set(adapters)
    hit = {name: kind for name, kind in quantized_layers(transformer).items()
           if wanted is None or wanted & set(getattr(transformer.get_submodule(name), "lora_A", {}))}
    if not hit:
        return None
    kinds = " and ".join(sorted(set(hit.values())))
    example = next(iter(hit))
    return (f"cannot fuse LoRAs into this transformer: {len(hit)} of its layers (e.g. {example}) hold {kinds} "
            "weights, and fusing would round the LoRA's change to that precision (or cannot write GGUF blocks). "
            "Keep the LoRAs unfused: leave PARTICALIZE_FUSE_LORA / --fuse-lora off (they then stay adapters, "
            "compiled or not); or use a bf16 transformer file")


def _diffusers_state_dict(plan: LoraPlan) -> dict[str, torch.Tensor]:
    """The plan's pairs in diffusers names, alpha / rank folded into lora_B (PEFT then scales by strength alone)."""
    state_dict = {}
    for module, pair in plan.pairs.items():
        state_dict[f"transformer.{module}.lora_A.weight"] = pair.down.contiguous()
        state_dict[f"transformer.{module}.lora_B.weight"] = (pair.up * pair.scale).contiguous()
    return state_dict


def _pairs_not_loaded(transformer: torch.nn.Module, plan: LoraPlan, adapter: str) -> set[str]:
    """Modules whose pair is not in their layer as the file has it. Where PEFT's own alpha / rank is not 1 (it
    takes one alpha for a file whose layers have several ranks), lora_B is corrected so the scale stays the file's."""
    missed = set()
    for module, pair in plan.pairs.items():
        layer = transformer.get_submodule(module)
        lora_a, lora_b = getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})
        if adapter not in lora_a or adapter not in lora_b:
            missed.add(module)
            continue
        a, b = lora_a[adapter].weight, lora_b[adapter].weight
        peft_scale = layer.lora_alpha[adapter] / layer.r[adapter]
        if peft_scale != 1.0:
            with torch.no_grad():
                b.div_(peft_scale)
        expected_b = pair.up * pair.scale
        if a.shape != pair.down.shape or b.shape != expected_b.shape or not (
            torch.allclose(a.float(), pair.down.to(a.device, a.dtype).float(), rtol=1e-3, atol=1e-6)
            and torch.allclose(b.float(), expected_b.to(b.device, b.dtype).float(), rtol=1e-2, atol=1e-6)
        ):
            missed.add(module)
    return missed
