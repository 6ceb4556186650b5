"""The operator's LoRA list as written in settings and on the command line: `SOURCE[:STRENGTH]`, comma-separated.

SOURCE is a local `.safetensors` path, or a hub file as `hf://owner/repo/path/in/repo.safetensors` (optionally
`hf://owner/repo@revision/...`), fetched by `particalize weights fetch`. No torch here: settings validate with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

HUB_SCHEME = "hf://"
MAX_STRENGTH = 4.0


@dataclass(frozen=True)
class LoraSource:
    text: str
    """The source as written (without the strength)."""
    strength: float
    path: Path | None = None
    repo: str | None = None
    file: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo is not None


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
    if not source:
        raise ValueError("empty LoRA entry: give a .safetensors path or hf://owner/repo/file.safetensors")
    if not source.startswith(HUB_SCHEME):
        return LoraSource(source, strength, path=Path(source).expanduser())
    parts = source[len(HUB_SCHEME):].split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"LoRA entry {entry!r}: a hub file is written hf://owner/repo/file.safetensors")
    repo_name, _, revision = parts[1].partition("@")
    return LoraSource(source, strength, repo=f"{parts[0]}/{repo_name}", file="/".join(parts[2:]),
                      revision=revision or None)


def parse_lora_list(text: str | None, default_strength: float = 1.0) -> list[LoraSource]:
    """A comma-separated list (empty or unset: none)."""
    if text is None or not text.strip():
        return []
    return [parse_lora_source(item, default_strength) for item in text.split(",") if item.strip()]
