"""Linear layers whose weights stay quantized in memory: float8 (Float8Linear, here) and GGUF (diffusers' GGUFLinear).

Why a Float8Linear and not diffusers' layerwise casting: that hook casts the whole module, bias included, back to
float8 after every forward; it has no per-tensor scale (ComfyUI's scaled fp8 files need weight x scale); and PEFT
puts a LoRA's A/B in the base layer's weight dtype, i.e. float8, rounding the LoRA. A Float8Linear keeps only the
weight in float8 (the bias and everything else in the compute dtype), multiplies by the file's scale when there is
one, and has a `compute_dtype` attribute, which PEFT reads (as it does for diffusers' GGUFLinear) to put a LoRA's
weights in that dtype: an unfused LoRA stays exact. Its forward changes no module state (thread-safe, compilable).

Both kinds can be turned back into a plain Linear, layer by layer (`unquantize`): LoRA full differences need that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Float8Linear(nn.Linear):
    """y = x @ (float8 weight in compute dtype x scale)^T + bias; only the weight is float8 in memory."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        if weight.dtype not in FLOAT8_DTYPES:
            raise TypeError(f"Float8Linear needs a float8 weight, got {weight.dtype}")
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.register_buffer("weight_scale", None if scale is None else scale.to(torch.float32))
        self.compute_dtype = compute_dtype

    def dequantized_weight(self) -> torch.Tensor:
        weight = self.weight.to(self.compute_dtype)
        if self.weight_scale is not None:
            weight = weight * self.weight_scale.to(self.compute_dtype)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Float8Linear:
        """`.to(device)` moves it; `.to(dtype)` (a pipeline cast) changes the compute dtype, the weight staying
        float8 (float8 -> any wider float -> float8 is exact)."""
        storage = self.weight.dtype
        super()._apply(fn, recurse)
        if self.weight.dtype != storage:
            if self.weight.dtype.is_floating_point:
                self.compute_dtype = self.weight.dtype
            self.weight.data = self.weight.data.to(storage)
        return self

    def extra_repr(self) -> str:
        scaled = ", scaled" if self.weight_scale is not None else ""
        return f"{super().extra_repr()}, weight={self.weight.dtype}{scaled}, compute={self.compute_dtype}"


def is_gguf_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and getattr(module.weight, "quant_type", None) is not None


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, Float8Linear) or is_gguf_linear(module)


def quantized_kind(module: nn.Module) -> str | None:
    """'float8_e4m3fn', 'float8_e5m2', 'GGUF Q8_0', ... or None for a layer that is not quantized."""
    if isinstance(module, Float8Linear):
        return str(module.weight.dtype).removeprefix("torch.")
    if is_gguf_linear(module):
        return f"GGUF {module.weight.quant_type.name}"
    return None


def dequantized(module: nn.Linear) -> nn.Linear:
    """A plain Linear computing exactly what `module` computes, its weight held in the compute dtype."""
    if isinstance(module, Float8Linear):
        weight = module.dequantized_weight()
    elif is_gguf_linear(module):
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        weight = dequantize_gguf_tensor(module.weight).to(module.compute_dtype)
    else:
        return module
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    if module.bias is not None:
        plain.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=False)
    return plain


def unquantize(model: nn.Module, parameter_names: Iterable[str]) -> list[str]:
    """Make the layers whose weights these are plain Linears (also inside a LoRA wrapper's `base_layer`); the
    names of the layers changed. Exact: the new weight is the one the quantized layer computed with. Other
    parameters (a quantized layer's bias is held in the compute dtype) change nothing."""
    changed = []
    for name in parameter_names:
        owner, _, leaf = name.rpartition(".")
        if not owner or leaf != "weight":
            continue
        module = model.get_submodule(owner)
        base = getattr(module, "base_layer", module)
        if not is_quantized_linear(base):
            continue
        if base is module:
            model.set_submodule(owner, dequantized(base))
        else:
            module.base_layer = dequantized(base)
        changed.append(owner)
    return changed


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Every quantized Linear (LoRA wrappers looked through) -> its kind."""
    found = {}
    for name, module in model.named_modules():
        if name.endswith("base_layer"):
            continue
        kind = quantized_kind(getattr(module, "base_layer", module))
        if kind is not None:
            found[name] = kind
    return found


def module_bytes(module: nn.Module) -> int:
    """Bytes its parameters and buffers take as held (float8 1 byte a weight, GGUF its blocks' bytes)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_meta or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total
