"""What a single weight file holds, read from its header only (no tensor is loaded): for the start-up banner, which
is printed before the workers load the model. The memory figure is `memory`'s, on the meta device, for the format
the header shows; the worker reports the exact figure once loaded (`loaded_file`, in /ready)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.weight_files.checkpoint_read import container_of, describe_counts
from pipeline.weight_files.loaded_file import size_text

SCALE_LEAVES = ("scale_weight", "weight_scale")
SAFETENSORS_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "BF16": "bfloat16", "F16": "float16",
                     "F32": "float32", "F64": "float64", "U8": "uint8", "I64": "int64", "I32": "int32"}
PLAIN_GGUF_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class FileSummary:
    path: Path
    container: str
    stored: str
    fmt: str
    """A weight_memory format: 'bf16' (any fp32/bf16/fp16 file), 'fp8', 'fp8_scaled' or 'gguf_<type>'."""
    file_bytes: int
    memory_bytes: int | None
    """Estimated bytes held in memory (None where weight_memory has no rule for the format)."""

    def describe(self) -> str:
        memory = f", ≈{size_text(self.memory_bytes)} in memory" if self.memory_bytes is not None else ""
        return (f"{self.path} ({self.container}, {self.fmt}; {self.stored}; {size_text(self.file_bytes)} on disk"
                f"{memory})")


def _safetensors_counts(path: Path) -> tuple[Counter[str], bool]:
    from safetensors import safe_open

    counts: Counter[str] = Counter()
    scaled = False
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            dtype = fh.get_slice(key).get_dtype()
            counts[SAFETENSORS_NAMES.get(dtype, dtype)] += 1
            scaled |= key.rpartition(".")[2] in SCALE_LEAVES or key == "scaled_fp8"
    return counts, scaled


def _gguf_counts(path: Path) -> Counter[str]:
    import gguf

    return Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors)


def _header(path: Path, container: str) -> tuple[Counter[str], str]:
    """The tensors' storage types counted, and the weight_memory format they make."""
    if container == "gguf":
        counts = _gguf_counts(path)
        quantized = Counter({k: n for k, n in counts.items() if k not in PLAIN_GGUF_TYPES})
        return counts, f"gguf_{quantized.most_common(1)[0][0]}" if quantized else "bf16"
    counts, scaled = _safetensors_counts(path)
    return counts, ("fp8_scaled" if scaled else "fp8") if any(k.startswith("float8") for k in counts) else "bf16"


def file_format(path: Path) -> str:
    """The weight_memory format of a .safetensors or .gguf file, read from its header (no tensor data read)."""
    path = Path(path)
    return _header(path, "gguf" if path.suffix.lower() == ".gguf" else "safetensors")[1]


def summarize(path: Path, role: str, config: Mapping[str, Any] | Any | None,
              compute_dtype: torch.dtype = torch.bfloat16) -> FileSummary:
    """The file at `path` as the `role` ('transformer' or 'text_encoder') loader would hold it. WeightsMissing or
    WeightFormatError as the loader raises them for a missing file or another extension."""
    from pipeline.errors import WeightFormatError
    from pipeline.weight_files.memory import TEXT_ENCODER_FORMATS, text_encoder_bytes, transformer_bytes

    path = Path(path)
    container = container_of(path, role.replace("_", " "))
    try:
        counts, fmt = _header(path, container)
    except Exception as exc:  # a truncated or foreign file: the loader says the same, with more detail
        raise WeightFormatError(f"cannot read the header of {path.name} as {container}: {exc}") from exc
    memory = None
    if config is not None:
        try:
            if role == "transformer":
                memory = transformer_bytes(fmt, config, compute_dtype)
            elif fmt in TEXT_ENCODER_FORMATS:
                memory = text_encoder_bytes(fmt, config, compute_dtype)
        except (ValueError, AttributeError, KeyError):  # a GGUF type weight_memory has no row for
            memory = None
    return FileSummary(path, container, describe_counts(counts), fmt, path.stat().st_size, memory)
