"""What lets a LoRA be taken out of the model again, leaving it as it was: its full differences must not touch a
quantized weight (loading them dequantizes that layer for good), and a layer PEFT wrapped for it alone gets its own
Linear back once its adapter is deleted (PEFT keeps the wrapper). Used for the LoRAs sent with one request
(pipeline/lora/request.py, LoraStack.drop)."""

from __future__ import annotations

import torch

from pipeline.weight_files.quantized_layers import FLOAT8_DTYPES, is_quantized_linear


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
