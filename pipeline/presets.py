"""Named model presets: where the base model comes from and the pixel budget it was trained for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelPreset:
    name: str
    repo_id: str | None
    """Hub repo in diffusers layout; None for the in-code tiny model."""
    max_area: int
    """Pixel budget used when width/height are 0 (the resolution the checkpoint was trained at)."""
    local_dir: Path | None = None

    @property
    def is_tiny(self) -> bool:
        return self.repo_id is None and self.local_dir is None


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("wan2.1-i2v-14b-480p", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", 480 * 832),
        ModelPreset("wan2.1-i2v-14b-720p", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", 720 * 1280),
        # Random weights built in code: deterministic, CPU-fast, for tests and trying the API.
        ModelPreset("tiny", None, 48 * 80),
    )
}


def get_preset(name_or_path: str) -> ModelPreset:
    """A preset by name, or a local diffusers directory (480P budget unless its name says 720)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        area = 720 * 1280 if "720" in path.name else 480 * 832
        return ModelPreset(f"local:{path}", None, area, local_dir=path.resolve())
    known = ", ".join(PRESETS)
    raise ValueError(f"unknown model {name_or_path!r}: use one of {known}, or a local diffusers directory")
