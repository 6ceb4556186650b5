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


def write_manifest(directory: Path, repo_id: str, revision: str | None, files: list[FileRecord]) -> Path:
    target = directory / MANIFEST_NAME
    body = {
        "repo_id": repo_id,
        "revision": revision,
        "files": {f.path: {"size": f.size, "sha256": f.sha256} for f in files},
    }
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
    tmp.replace(target)
    return target


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
