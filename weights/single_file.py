"""Weight files as an operator names them (a transformer or text encoder checkpoint, issue 18, and each LoRA): a local
path, `hf://owner/repo[@revision]/path/in/repo`, or a huggingface.co file URL; where a fetched one lives; and the
offline check of one file (size and sha256 from the manifest `weights fetch` wrote, readable header). No torch here."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from weights.manifest import read_manifest, sha256_of

HUB_SCHEME = "hf://"
HUB_URL = re.compile(r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/(?P<rev>[^/]+)/(?P<file>.+)$")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class FileSource:
    """One weights file as an operator names it: a local path, or a hub file that `weights fetch` downloads.
    A LoRA is the same with a strength (`weights.lora_sources.LoraSource`)."""

    text: str
    """As written (a LoRA's without its strength)."""
    path: Path | None = None
    repo: str | None = None
    file: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo is not None


def parse_file_source(text: str, *, what: str = "weights file",
                      example: str = "hf://owner/repo/path/to/file") -> FileSource:
    """A local path, `hf://owner/repo[@rev]/file`, or `https://huggingface.co/owner/repo/blob|resolve/rev/file`;
    ValueError naming `what` was given and showing `example` for what to write instead."""
    text = text.strip()
    if not text:
        raise ValueError(f"empty {what}: give a local path or {example}")
    url = HUB_URL.match(text.split("?", 1)[0])
    if url:
        return FileSource(text, repo=url["repo"], file=url["file"], revision=url["rev"])
    if text.startswith(("http://", "https://")):
        raise ValueError(f"{what} {text!r}: only huggingface.co file URLs (…/blob/<revision>/<file>) or {example} "
                         "can be fetched")
    if not text.startswith(HUB_SCHEME):
        return FileSource(text, path=Path(text).expanduser())
    parts = text[len(HUB_SCHEME):].split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{what} {text!r}: a hub file is written {example}")
    name, _, revision = parts[1].partition("@")
    return FileSource(text, repo=f"{parts[0]}/{name}", file="/".join(parts[2:]), revision=revision or None)


def hub_folder(root: Path, repo_id: str) -> Path:
    """The folder under `root` that holds the fetched files of one hub repo (with its manifest)."""
    return root / repo_id.replace("/", "--")


def files_dir(weights_dir: Path, repo_id: str) -> Path:
    """Where `weights fetch` puts single files of one hub repo (LoRAs have their own: `weights.locate.lora_dir`)."""
    return hub_folder(weights_dir / "files", repo_id)


def source_path(source: FileSource, weights_dir: Path,
                folder: Callable[[Path, str], Path] = files_dir) -> Path:
    """Where the file is (or will be, once fetched into `folder(weights_dir, repo)`) on disk."""
    if source.path is not None:
        return source.path
    assert source.repo is not None and source.file is not None
    return folder(weights_dir, source.repo) / source.file


def _header_problem(path: Path) -> str | None:
    """A truncated or foreign file, found from its first bytes (safetensors: 8-byte header length + JSON)."""
    with path.open("rb") as fh:
        head = fh.read(8)
    if path.suffix.lower() == ".gguf":
        return None if head[:4] == GGUF_MAGIC else f"{path}: not a GGUF file (no GGUF magic)"
    if len(head) < 8:
        return f"{path}: not a safetensors file (too short)"
    (length,) = struct.unpack("<Q", head)
    if length <= 2 or 8 + length > path.stat().st_size:
        return f"{path}: not a readable safetensors file (header of {length} bytes in a file of {path.stat().st_size})"
    return None


def verify_file(path: Path, manifest_dir: Path | None = None, *, full_hash: bool = True) -> list[str]:
    """Problems with one weights file: missing, a size or sha256 other than the manifest records (in
    `manifest_dir`, default the file's folder; written when it was fetched, the hub publishing sha256 for LFS
    files), or a first few bytes that are not its format's header."""
    path = Path(path)
    if not path.is_file():
        return [f"{path}: missing"]
    directory = manifest_dir or path.parent
    manifest = read_manifest(directory) or {}
    record = next((meta for rel, meta in manifest.get("files", {}).items()
                   if (directory / rel).resolve() == path.resolve()), None)
    if record is not None and record.get("size") is not None and path.stat().st_size != record["size"]:
        return [f"{path}: size {path.stat().st_size}, expected {record['size']}"]
    problems = []
    if record is not None and full_hash and record.get("sha256") and sha256_of(path) != record["sha256"]:
        problems.append(f"{path}: sha256 differs from the hub's")
    header = _header_problem(path)
    if header:
        problems.append(header)
    return problems


def verify_source(source: FileSource, weights_dir: Path, *, full_hash: bool = True) -> list[str]:
    """verify_file for a configured source (a fetched hub file is checked against its repo's manifest)."""
    manifest_dir = files_dir(weights_dir, source.repo) if source.is_hub else None
    return verify_file(source_path(source, weights_dir), manifest_dir, full_hash=full_hash)
