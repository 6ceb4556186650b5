"""Where each weights file is expected on disk. Loading reads only these paths; it never reaches a hub."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import WeightsMissing

if TYPE_CHECKING:
    from particalize.settings import Settings


def lora_dir(weights_dir: Path, repo_id: str) -> Path:
    return weights_dir / "lora" / repo_id.replace("/", "--")


def lora_file_from_settings(settings: Settings) -> Path | None:
    """The LoRA file the operator configured: a local path, or a fetched hub file; None when none is set."""
    if settings.lora_path is not None:
        path = Path(settings.lora_path).expanduser()
        if not path.is_file():
            raise WeightsMissing(f"PARTICALIZE_LORA_PATH points at {path}, which is not a file")
        return path
    if settings.lora_repo:
        if not settings.lora_file:
            raise WeightsMissing("PARTICALIZE_LORA_REPO is set but PARTICALIZE_LORA_FILE (the file name) is not")
        path = lora_dir(settings.weights_dir, settings.lora_repo) / settings.lora_file
        if not path.is_file():
            raise WeightsMissing(
                f"LoRA {settings.lora_repo}/{settings.lora_file} is not on disk at {path}: "
                "run `particalize weights fetch`"
            )
        return path
    if settings.require_lora:
        raise WeightsMissing(
            "no Particalize LoRA configured: set PARTICALIZE_LORA_PATH, or PARTICALIZE_LORA_REPO and "
            "PARTICALIZE_LORA_FILE (see weights/README.md)"
        )
    return None
