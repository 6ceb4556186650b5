"""Named model presets: where the base model comes from and the pixel budget it was trained for."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST_NAME = ".particalize-manifest.json"
"""The record `particalize weights fetch` writes into a snapshot (weights.manifest); read here for its repo id."""


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


def get_preset(name_or_path: str, max_area: int | None = None) -> ModelPreset:
    """A preset by name, or a local diffusers directory. A directory's pixel budget is `max_area` when given
    (PARTICALIZE_MODEL_MAX_AREA), else what its metadata says (`snapshot_max_area`), else 480P's; never its name."""
    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        return preset if max_area is None else replace(preset, max_area=max_area)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        area = max_area or snapshot_max_area(path)
        if area is None:
            log.warning("%s does not say which resolution it was trained for (no manifest, not in a hub cache); "
                        "using 480P's pixel budget: set PARTICALIZE_MODEL_MAX_AREA for a 720P model", path)
            area = PRESETS["wan2.1-i2v-14b-480p"].max_area
        return ModelPreset(f"local:{path}", None, area, local_dir=path.resolve())
    known = ", ".join(PRESETS)
    raise ValueError(f"unknown model {name_or_path!r}: use one of {known}, or a local diffusers directory")


def snapshot_repo_id(path: Path) -> str | None:
    """The hub repo a snapshot came from, from its own metadata: the manifest `weights fetch` writes, or the
    hub cache's layout (<cache>/models--<owner>--<name>/snapshots/<commit>)."""
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        try:
            repo_id = json.loads(manifest.read_text()).get("repo_id")
        except (OSError, ValueError, AttributeError):
            repo_id = None
        if isinstance(repo_id, str) and repo_id:
            return repo_id
    resolved = path.resolve() if path.exists() else path
    for candidate in (path.absolute(), resolved):
        if candidate.parent.name == "snapshots" and candidate.parent.parent.name.startswith("models--"):
            return candidate.parent.parent.name.removeprefix("models--").replace("--", "/")
    return None


def snapshot_max_area(path: Path) -> int | None:
    """The pixel budget of the checkpoint a snapshot holds, when its repo id says (a preset's repo, or a repo
    named for 480P or 720P); None when its metadata does not tell."""
    repo_id = snapshot_repo_id(path)
    if repo_id is None:
        return None
    for preset in PRESETS.values():
        if preset.repo_id is not None and preset.repo_id.lower() == repo_id.lower():
            return preset.max_area
    for tag, name in (("720p", "wan2.1-i2v-14b-720p"), ("480p", "wan2.1-i2v-14b-480p")):
        if re.search(rf"(?<![0-9]){tag}(?![0-9])", repo_id.lower()):
            return PRESETS[name].max_area
    return None
