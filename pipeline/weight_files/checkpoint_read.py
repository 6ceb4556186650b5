"""Read a single-file checkpoint from disk as its own keys and tensors: safetensors, or GGUF through diffusers.

Only files that cannot run code are read: pickles (.pth, .pt, .ckpt, .bin) are refused with what to use instead.
Nothing here reaches a hub: the path must be a local file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from pipeline.errors import WeightFormatError, WeightsMissing

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
GGUF_SUFFIX = ".gguf"
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")


def container_of(path: Path, what: str) -> str:
    """'safetensors' or 'gguf'; WeightsMissing for a missing file, WeightFormatError for another extension."""
    path = Path(path)
    if not path.is_file():
        raise WeightsMissing(f"{what} file {path} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix == GGUF_SUFFIX:
        return "gguf"
    if suffix in PICKLE_SUFFIXES:
        raise WeightFormatError(f"{path.name}: {suffix} files are pickles (loading one can run code) and are not "
                                f"read; use the .safetensors (or, for the transformer, .gguf) release of the {what}")
    raise WeightFormatError(f"{path.name}: unknown extension {suffix or '(none)'!r}; a {what} file must be "
                            ".safetensors or .gguf")


def read_checkpoint(path: Path, container: str) -> dict[str, torch.Tensor]:
    """Every tensor of the file under its own key (GGUF quantized tensors as diffusers' GGUFParameter)."""
    try:
        if container == "gguf":
            from diffusers.models.model_loading_utils import load_gguf_checkpoint

            return load_gguf_checkpoint(str(path))
        from safetensors.torch import load_file

        return load_file(str(path))
    except ImportError as exc:
        raise WeightFormatError(f"{Path(path).name}: reading GGUF needs the gguf package "
                                "(`pip install gguf`)") from exc
    except Exception as exc:  # truncated, not that format, unsupported GGUF quantization
        raise WeightFormatError(f"cannot read {Path(path).name} as {container}: {exc}") from exc


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The keys under `prefix` without it (other keys dropped: a full checkpoint also holds other models), and
    whether the prefix was there."""
    if not any(key.startswith(prefix) for key in state_dict):
        return state_dict, False
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}, True


def storage_counts(state_dict: dict[str, torch.Tensor]) -> Counter[str]:
    """How many tensors the file stores in each dtype or GGUF type, e.g. {'float8_e4m3fn': 160, 'float32': 80}."""
    counts: Counter[str] = Counter()
    for tensor in state_dict.values():
        quant = getattr(tensor, "quant_type", None)
        counts[quant.name if quant is not None else str(tensor.dtype).removeprefix("torch.")] += 1
    return counts


def describe_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{name} x {n}" for name, n in counts.most_common())
