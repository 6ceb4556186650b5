"""Does a checkpoint fit a model built from the preset's config: every key there, none extra, every shape right.

Checked before any weight is loaded, so that a wrong file (another model, another size) is refused with the keys
that show it, instead of a shape error deep in a loader or parameters silently left uninitialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SHOWN = 4


def tensor_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape a tensor has as a model parameter (a GGUF tensor's decoded shape, not its bytes')."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every key of the model's state dict with its shape (works on the meta device)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@dataclass
class Fit:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    """(key, shape in the file, shape the config wants)."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    def describe(self, file_name: dict[str, str] | None = None) -> str:
        """The problems, each key named as the file has it (`file_name` maps model keys back)."""
        named = file_name or {}
        parts = []
        if self.misshaped:
            shown = "; ".join(f"{named.get(k, k)} is {list(got)} in the file, the config wants {list(want)}"
                              for k, got, want in self.misshaped[:SHOWN])
            parts.append(f"{_count(self.misshaped, 'tensor has', 'tensors have')} other shapes ({shown})")
        if self.missing:
            missing = ", ".join(self.missing[:SHOWN])
            parts.append(f"{_count(self.missing, 'key is', 'keys are')} missing ({missing})")
        if self.unexpected:
            shown = ", ".join(named.get(k, k) for k in self.unexpected[:SHOWN])
            parts.append(f"{_count(self.unexpected, 'key fits', 'keys fit')} nothing ({shown})")
        return "; ".join(parts)


def _count(items: list, one: str, many: str) -> str:
    return f"{len(items)} {one if len(items) == 1 else many}"


def compare(expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor]) -> Fit:
    fit = Fit()
    for key, shape in expected.items():
        if key not in found:
            fit.missing.append(key)
        elif tensor_shape(found[key]) != shape:
            fit.misshaped.append((key, tensor_shape(found[key]), shape))
    fit.unexpected = [key for key in found if key not in expected]
    return fit
