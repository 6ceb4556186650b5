"""Full-weight differences (`diff`, `diff_b`, `diff_m`) of several LoRAs, each switchable with its strength.

diffusers' converter drops these keys (norms, modulation tables, patch embedding, img_emb) or turns some into
PEFT biases, so they are applied here instead: every parameter a difference touches keeps its original value,
and its value in use is always recomputed as original + sum(strength x difference) over the active LoRAs. That
is exact however often the strengths change (per request, for fast mode), with no drift from add-then-subtract.
"""

from __future__ import annotations

import torch


class WeightDiffs:
    """The differences of every loaded LoRA, by adapter name and parameter name."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module
        self._original: dict[str, torch.Tensor] = {}
        self._diffs: dict[str, dict[str, torch.Tensor]] = {}
        self._weights: dict[str, float] = {}

    def _param(self, name: str) -> torch.nn.Parameter:
        owner, _, leaf = name.rpartition(".")
        module = self._module.get_submodule(owner) if owner else self._module
        module = getattr(module, "base_layer", module)  # a LoRA-wrapped Linear keeps its weights there
        return getattr(module, leaf)

    def add(self, adapter: str, deltas: dict[str, torch.Tensor], weight: float) -> None:
        """Register `adapter`'s differences (shapes already checked) and apply them at `weight`."""
        stored = {}
        for name, delta in deltas.items():
            param = self._param(name)
            if name not in self._original:
                self._original[name] = param.detach().clone()
            stored[name] = delta.to(device=param.device)
        self._diffs[adapter] = stored
        self._weights[adapter] = weight
        self._refresh(stored)

    def names(self, adapter: str) -> list[str]:
        return list(self._diffs.get(adapter, {}))

    def set_weights(self, weights: dict[str, float]) -> None:
        """Strength of each adapter (one left out: 0, i.e. inactive)."""
        changed = {a for a in self._diffs if self._weights.get(a, 0.0) != weights.get(a, 0.0)}
        for adapter in self._diffs:
            self._weights[adapter] = weights.get(adapter, 0.0)
        touched: set[str] = set()
        for adapter in changed:
            touched.update(self._diffs[adapter])
        self._refresh(touched)

    def remove(self, adapter: str) -> None:
        """Take `adapter`'s differences out: each parameter they touch is rewritten as original + the other
        adapters' (exact), and the copy of one no other adapter changes is freed (its value is the original)."""
        diffs = self._diffs.pop(adapter, {})
        self._weights.pop(adapter, None)
        self._refresh(diffs)
        still_used = {n for other in self._diffs.values() for n in other}
        for name in diffs:
            if name not in still_used:
                del self._original[name]

    def fold(self, adapters: list[str]) -> None:
        """Make `adapters`' differences part of the originals at their current strength (fusing): they can no
        longer be switched, and their copies are freed."""
        for adapter in adapters:
            diffs = self._diffs.pop(adapter, {})
            weight = self._weights.pop(adapter, 0.0)
            for name, delta in diffs.items():
                original = self._original[name]
                self._original[name] = (original.float() + weight * delta.float()).to(original.dtype)
        still_used = {n for diffs in self._diffs.values() for n in diffs}
        for name in list(self._original):
            if name not in still_used:
                del self._original[name]  # its value in use is final now

    def _refresh(self, names: object) -> None:
        with torch.no_grad():
            for name in names:
                original = self._original[name]
                value = original.float()
                for adapter, diffs in self._diffs.items():
                    weight = self._weights.get(adapter, 0.0)
                    if name in diffs and weight:
                        value = value + weight * diffs[name].float()
                self._param(name).copy_(value.to(original.dtype))
