"""The operator's LoRA list as written in settings and on the command line: `SOURCE[:STRENGTH]`, comma-separated.

SOURCE is a weights file as `weights.single_file` reads one: a local `.safetensors` path, or a hub file as
`hf://owner/repo/path/in/repo.safetensors` (optionally `hf://owner/repo@revision/...`) or a huggingface.co file URL,
fetched by `particalize weights fetch`. No torch here: settings validate with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from weights.single_file import FileSource, parse_file_source

MAX_STRENGTH = 4.0


@dataclass(frozen=True)
class LoraSource(FileSource):
    """A weights file with the strength its adapter is applied at."""

    strength: float = 1.0


def _strength(text: str, entry: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"LoRA entry {entry!r}: strength {text!r} is not a number (write SOURCE:0.8)") from None
    if not math.isfinite(value) or not 0.0 <= value <= MAX_STRENGTH:
        raise ValueError(f"LoRA entry {entry!r}: strength must be between 0 and {MAX_STRENGTH:g}, got {text}")
    return value


def parse_lora_source(entry: str, default_strength: float = 1.0) -> LoraSource:
    """One `SOURCE[:STRENGTH]`; ValueError saying what to write instead."""
    entry = entry.strip()
    source, strength = entry, default_strength
    head, sep, tail = entry.rpartition(":")
    if sep and head and "/" not in tail and not tail.startswith("//"):
        source, strength = head, _strength(tail, entry)
    where = parse_file_source(source, what="LoRA entry", example="hf://owner/repo/file.safetensors")
    return LoraSource(**asdict(where), strength=strength)


def parse_lora_list(text: str | None, default_strength: float = 1.0) -> list[LoraSource]:
    """A comma-separated list (empty or unset: none)."""
    if text is None or not text.strip():
        return []
    return [parse_lora_source(item, default_strength) for item in text.split(",") if item.strip()]
