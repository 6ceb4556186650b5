"""A record of what was fetched (file sizes and sha256 from the hub), so `verify` can check it later offline."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.presets import MANIFEST_NAME


@dataclass(frozen=True)
class FileRecord:
    path: str
    size: int | None
    sha256: str | None


def write_manifest(directory: Path, repo_id: str | None, revision: str | None, files: list[FileRecord],
                   local_files: list[str] | tuple[str, ...] = ()) -> Path:
    """`local_files`: the files of `files` made on this machine, not fetched (a MagCache calibration)."""
    target = directory / MANIFEST_NAME
    body = {
        "repo_id": repo_id,
        "revision": revision,
        "files": {f.path: {"size": f.size, "sha256": f.sha256} for f in files},
    }
    if local_files:
        body["local_files"] = sorted(local_files)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
    tmp.replace(target)
    return target


def record_local_file(directory: Path, rel: str) -> Path:
    """Record a file made here (`particalize calibrate`'s ratios) in the directory's manifest, with its size and
    sha256, so that `weights verify` checks it; `weights fetch` keeps such records when it rewrites the manifest."""
    manifest = read_manifest(directory) or {"repo_id": None, "revision": None, "files": {}}
    path = directory / rel
    files = {**manifest["files"], rel: {"size": path.stat().st_size, "sha256": sha256_of(path)}}
    return write_manifest(directory, manifest.get("repo_id"), manifest.get("revision"),
                          [FileRecord(name, meta.get("size"), meta.get("sha256")) for name, meta in files.items()],
                          local_files=sorted(set(manifest.get("local_files", [])) | {rel}))


def local_records(manifest: dict | None) -> list[FileRecord]:
    """The records of files made here, not fetched (kept when a fetch rewrites the manifest)."""
    if manifest is None:
        return []
    local = set(manifest.get("local_files", []))
    return [FileRecord(rel, meta.get("size"), meta.get("sha256")) for rel, meta in manifest["files"].items()
            if rel in local]


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def sha256_of(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
