"""Download a preset's diffusers snapshot and the LoRA with huggingface_hub (progress bars, resumable)."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import WeightsMissing
from pipeline.loader import preset_dir
from pipeline.presets import ModelPreset
from weights.locate import lora_dir
from weights.manifest import FileRecord, local_records, read_manifest, write_manifest
from weights.single_file import FileSource, files_dir

# The pipeline reads only these: skip the original (non-diffusers) checkpoints some repos carry too.
SNAPSHOT_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model", "*/spiece*"]


def _records(repo_id: str, revision: str | None, token: str | None, wanted: set[str] | None) -> tuple[str, list]:
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
    records = []
    for sibling in info.siblings or []:
        if wanted is not None and sibling.rfilename not in wanted:
            continue
        sha = sibling.lfs.sha256 if sibling.lfs is not None else None
        records.append(FileRecord(sibling.rfilename, sibling.size, sha))
    return info.sha, records


def fetch_model(preset: ModelPreset, weights_dir: Path, token: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    if preset.repo_id is None:
        raise ValueError(f"model {preset.name} is not fetched from a hub")
    target = preset_dir(preset, weights_dir)
    target.mkdir(parents=True, exist_ok=True)
    revision, _ = _records(preset.repo_id, None, token, wanted=set())
    snapshot_download(
        preset.repo_id, revision=revision, local_dir=target, allow_patterns=SNAPSHOT_PATTERNS, token=token
    )
    present = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file() and ".cache" not in p.parts}
    _, records = _records(preset.repo_id, revision, token, wanted=present)
    local = [r for r in local_records(read_manifest(target)) if r.path not in {h.path for h in records}]
    write_manifest(target, preset.repo_id, revision, records + local, local_files=[r.path for r in local])
    return target


def fetch_lora(repo_id: str, filename: str, weights_dir: Path, revision: str | None = None,
               token: str | None = None) -> Path:
    from huggingface_hub import hf_hub_download

    target = lora_dir(weights_dir, repo_id)
    target.mkdir(parents=True, exist_ok=True)
    path = Path(hf_hub_download(repo_id, filename, revision=revision, local_dir=target, token=token))
    sha, records = _records(repo_id, revision, token, wanted={filename})
    write_manifest(target, repo_id, sha, records)
    return path


def fetch_single_file(source: FileSource, weights_dir: Path, token: str | None = None) -> Path:
    """Download one transformer or text-encoder file (resumable) into `files_dir`, and add its size and sha256 to
    that folder's manifest (one repo often holds both files, e.g. ComfyUI's repackaged Wan2.1)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if not source.is_hub:
        raise ValueError(f"{source.text} is a local file: nothing to fetch")
    assert source.repo is not None and source.file is not None
    target = files_dir(weights_dir, source.repo)
    target.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(hf_hub_download(source.repo, source.file, revision=source.revision, local_dir=target,
                                    token=token))
        sha, records = _records(source.repo, source.revision, token, wanted={source.file})
    except (OSError, ValueError, EntryNotFoundError) as exc:  # no network, no such repo or file, gated
        raise WeightsMissing(f"cannot fetch {source.text} from huggingface.co ({str(exc).splitlines()[0]}): check "
                             "the network, the repo and file name, and PARTICALIZE_HF_TOKEN for a gated repo; or "
                             "download the file elsewhere and give its local path") from exc
    known = (read_manifest(target) or {}).get("files", {})
    kept = [FileRecord(rel, meta.get("size"), meta.get("sha256")) for rel, meta in known.items() if rel != source.file]
    write_manifest(target, source.repo, sha, kept + records)
    return path
