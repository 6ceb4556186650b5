"""Where each weights file is expected on disk. Loading reads only these paths; it never reaches a hub."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import WeightsMissing
from weights.lora_sources import LoraSource
from weights.single_file import hub_folder, source_path


@dataclass(frozen=True)
class LoraSources:
    """The LoRAs the operator configured, as configured (the entry points compose this from their settings)."""

    weights_dir: Path
    lora_path: Path | None = None
    """The Particalize LoRA as a local file (PARTICALIZE_LORA_PATH) ..."""
    lora_repo: str | None = None
    """... or as a hub file (PARTICALIZE_LORA_REPO + PARTICALIZE_LORA_FILE), fetched into weights_dir."""
    lora_file: str | None = None
    lora_revision: str | None = None
    lora_strength: float = 1.0
    loras: tuple[LoraSource, ...] = ()
    """More LoRAs stacked after it (PARTICALIZE_LORAS)."""
    speed_lora: LoraSource | None = None
    """Fast mode's step-distilled LoRA (PARTICALIZE_SPEED_LORA)."""
    require_lora: bool = False


def lora_dir(weights_dir: Path, repo_id: str) -> Path:
    """Where `weights fetch` puts the LoRAs of one hub repo (apart from single weight files: `files_dir`)."""
    return hub_folder(weights_dir / "lora", repo_id)


def first_lora_file(sources: LoraSources) -> Path | None:
    """The LoRA file the operator configured: a local path, or a fetched hub file; None when none is set."""
    if sources.lora_path is not None:
        path = Path(sources.lora_path).expanduser()
        if not path.is_file():
            raise WeightsMissing(f"PARTICALIZE_LORA_PATH points at {path}, which is not a file")
        return path
    if sources.lora_repo:
        if not sources.lora_file:
            raise WeightsMissing("PARTICALIZE_LORA_REPO is set but PARTICALIZE_LORA_FILE (the file name) is not")
        path = lora_dir(sources.weights_dir, sources.lora_repo) / sources.lora_file
        if not path.is_file():
            raise WeightsMissing(
                f"LoRA {sources.lora_repo}/{sources.lora_file} is not on disk at {path}: "
                "run `particalize weights fetch`"
            )
        return path
    if sources.require_lora and not sources.loras:
        raise WeightsMissing(
            "no Particalize LoRA configured: set PARTICALIZE_LORA_PATH, or PARTICALIZE_LORA_REPO and "
            "PARTICALIZE_LORA_FILE, or PARTICALIZE_LORAS (see weights/README.md)"
        )
    return None


def stack_sources(sources: LoraSources) -> list[LoraSource]:
    """The LoRA stack, in order: the single LORA_PATH (or LORA_REPO + LORA_FILE) first, then PARTICALIZE_LORAS."""
    first: list[LoraSource] = []
    if sources.lora_path is not None:
        first.append(LoraSource(str(sources.lora_path), path=Path(sources.lora_path).expanduser(),
                                strength=sources.lora_strength))
    elif sources.lora_repo and sources.lora_file:
        first.append(LoraSource(f"hf://{sources.lora_repo}/{sources.lora_file}", repo=sources.lora_repo,
                                file=sources.lora_file, revision=sources.lora_revision, strength=sources.lora_strength))
    return first + list(sources.loras)


def lora_source_file(source: LoraSource, weights_dir: Path, setting: str = "PARTICALIZE_LORAS") -> Path:
    """Where `source` is on disk; WeightsMissing naming the setting and the command that fetches it."""
    path = source_path(source, weights_dir, lora_dir)
    if path.is_file():
        return path
    if not source.is_hub:
        raise WeightsMissing(f"{setting} names {path}, which is not a file")
    raise WeightsMissing(f"LoRA {source.text} ({setting}) is not on disk at {path}: "
                         "run `particalize weights fetch`")


def speed_lora_file(sources: LoraSources) -> tuple[LoraSource, Path] | None:
    """The speed LoRA (fast mode) with its file on disk, or None when none is configured."""
    if sources.speed_lora is None:
        return None
    return sources.speed_lora, lora_source_file(sources.speed_lora, sources.weights_dir, "PARTICALIZE_SPEED_LORA")


def stack_files(sources: LoraSources) -> list[tuple[LoraSource, Path]]:
    """Every LoRA of the stack with its file on disk (the speed LoRA is apart: `speed_lora_file`)."""
    stack = stack_sources(sources)
    first = first_lora_file(sources)  # LORA_PATH or LORA_REPO + LORA_FILE, with their own messages
    pairs = [(stack.pop(0), first)] if first is not None else []
    pairs += [(s, lora_source_file(s, sources.weights_dir)) for s in stack]
    return pairs
