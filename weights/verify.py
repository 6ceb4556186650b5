"""Check weights on disk without a network: completeness, fetched sizes and sha256, readable safetensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.loader import missing_files
from weights.manifest import read_manifest, sha256_of


@dataclass
class Report:
    directory: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _readable_safetensors(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # truncated or not a safetensors file
        return f"{path}: not a readable safetensors file ({exc})"
    return None


def verify_directory(directory: Path, *, full_hash: bool = True, is_model: bool = True) -> Report:
    report = Report(directory)
    if not directory.is_dir():
        report.problems.append(f"{directory}: does not exist")
        return report
    if is_model:
        report.problems.extend(f"{p}: missing" for p in missing_files(directory))
    manifest = read_manifest(directory)
    if manifest is not None:
        local = set(manifest.get("local_files", []))
        for rel, meta in manifest["files"].items():
            path = directory / rel
            report.checked += 1
            if not path.is_file():
                report.problems.append(f"{path}: missing")
                continue
            if meta.get("size") is not None and path.stat().st_size != meta["size"]:
                report.problems.append(f"{path}: size {path.stat().st_size}, expected {meta['size']}")
                continue
            if full_hash and meta.get("sha256") and sha256_of(path) != meta["sha256"]:
                made_here = "the one recorded when it was made here" if rel in local else "the hub's"
                report.problems.append(f"{path}: sha256 differs from {made_here}")
    for path in sorted(directory.rglob("*.safetensors")):
        if ".cache" in path.parts:
            continue
        if manifest is None:
            report.checked += 1
        problem = _readable_safetensors(path)
        if problem:
            report.problems.append(problem)
    return report
