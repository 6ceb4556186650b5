"""What a model was loaded from when it came from a single file: for the start-up banner, /ready and logs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

ATTRIBUTE = "_particalize_loaded_file"


@dataclass(frozen=True)
class LoadedFile:
    role: str
    """'transformer' or 'text_encoder'."""
    path: Path
    container: str
    """'safetensors' or 'gguf'."""
    layout: str
    """'original Wan', 'ComfyUI (model.diffusion_model.)', 'diffusers', 'transformers UMT5'."""
    stored: str
    """Tensors per stored dtype or GGUF type, e.g. 'float8_e4m3fn x 160, bfloat16 x 80'."""
    held: str
    """How the weights are held in memory, e.g. 'float8_e4m3fn weights (scaled), compute bfloat16'."""
    file_bytes: int
    memory_bytes: int
    """Parameters and buffers as held in memory."""

    def describe(self) -> str:
        return (f"{self.role} from {self.path.name} ({self.container}, {self.layout} keys; {self.stored}): "
                f"{self.held}, {size_text(self.memory_bytes)} in memory")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def attach(module: nn.Module, info: LoadedFile) -> None:
    setattr(module, ATTRIBUTE, info)


def loaded_file_of(module: object) -> LoadedFile | None:
    """The file a pipeline component was loaded from, or None when it came from a diffusers directory or code."""
    return getattr(module, ATTRIBUTE, None)
