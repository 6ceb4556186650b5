"""Where each weights file is expected on disk. Loading reads only these paths; it never reaches a hub."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import WeightsMissing
from weights.lora_sources import LoraSource, parse_lora_list, parse_lora_source

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
    if settings.require_lora and not settings.loras:
        raise WeightsMissing(
            "no Particalize LoRA configured: set PARTICALIZE_LORA_PATH, or PARTICALIZE_LORA_REPO and "
            "PARTICALIZE_LORA_FILE, or PARTICALIZE_LORAS (see weights/README.md)"
        )
    return None


def lora_sources_from_settings(settings: Settings) -> list[LoraSource]:
    """The LoRA stack, in order: the single LORA_PATH (or LORA_REPO + LORA_FILE) first, then PARTICALIZE_LORAS."""
    sources: list[LoraSource] = []
    if settings.lora_path is not None:
        sources.append(LoraSource(str(settings.lora_path), settings.lora_strength,
                                  path=Path(settings.lora_path).expanduser()))
    elif settings.lora_repo and settings.lora_file:
        sources.append(LoraSource(f"hf://{settings.lora_repo}/{settings.lora_file}", settings.lora_strength,
                                  repo=settings.lora_repo, file=settings.lora_file, revision=settings.lora_revision))
    return sources + parse_lora_list(settings.loras, settings.lora_strength)


def speed_lora_source(settings: Settings) -> LoraSource | None:
    return parse_lora_source(settings.speed_lora) if settings.speed_lora else None


def lora_source_file(source: LoraSource, weights_dir: Path, setting: str = "PARTICALIZE_LORAS") -> Path:
    """Where `source` is on disk; WeightsMissing naming the setting and the command that fetches it."""
    if source.path is not None:
        if not source.path.is_file():
            raise WeightsMissing(f"{setting} names {source.path}, which is not a file")
        return source.path
    assert source.repo is not None and source.file is not None
    path = lora_dir(weights_dir, source.repo) / source.file
    if not path.is_file():
        raise WeightsMissing(f"LoRA {source.text} ({setting}) is not on disk at {path}: "
                             "run `particalize weights fetch`")
    return path


def speed_lora_file(settings: Settings) -> tuple[LoraSource, Path] | None:
    """The speed LoRA (fast mode) with its file on disk, or None when none is configured."""
    source = speed_lora_source(settings)
    if source is None:
        return None
    return source, lora_source_file(source, settings.weights_dir, "PARTICALIZE_SPEED_LORA")


def lora_files_from_settings(settings: Settings) -> list[tuple[LoraSource, Path]]:
    """Every LoRA of the stack with its file on disk (the speed LoRA is apart: `speed_lora_source`)."""
    sources = lora_sources_from_settings(settings)
    first = lora_file_from_settings(settings)  # LORA_PATH or LORA_REPO + LORA_FILE, with their own messages
    pairs = [(sources.pop(0), first)] if first is not None else []
    pairs += [(s, lora_source_file(s, settings.weights_dir)) for s in sources]
    return pairs
