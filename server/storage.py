"""Where output files live and the URLs they are served at.

Outputs live in an fsspec filesystem (StorageOptions.url: a local directory, a shared mount, s3://, gs://, ...;
by default the local data_dir/outputs) as <root>/<task uuid>/<name>. Each is stored atomically: copied to a hidden
temporary name beside its final one, then moved into place, so a reader never sees a half-written file. They are
served at <public base URL>/files/<task uuid>/<name> by any API replica configured with the same storage_url.
Uploaded inputs live in the database and are served at <public base URL>/files/uploads/<upload id>/<name>.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from server.errors import public_text

log = logging.getLogger("particalize.storage")

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

OUTPUT_NAME = "0.mp4"
OUTPUT_TYPE = "video/mp4"
CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StorageOptions:
    """Where outputs are stored and the URL they are served under."""

    url: str
    """An fsspec URL or a local directory."""
    base_url: str
    """This server's public base; outputs are served at <base_url>/files/..."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """fsspec options for `url` (endpoint_url, key, secret, ...)."""


class StorageError(Exception):
    """Storing an output failed; the message says what and why (a client reads it in debugerror)."""


@dataclass(frozen=True)
class StoredFile:
    """An output found in the storage: its size, and its path when the storage is a local directory."""

    relpath: str
    size: int | None
    local_path: Path | None


def safe_name(name: str, default: str) -> str:
    """A file name that is one plain path segment (no directories, no leading dot)."""
    cleaned = _UNSAFE_CHARS.sub("-", Path(name or "").name).strip("-.")[:100]
    return cleaned if cleaned and _NAME.fullmatch(cleaned) else default


def content_type_of(name: str) -> str:
    if name.endswith(".mp4"):
        return OUTPUT_TYPE
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _existing_ancestor(path: Path) -> Path:
    """`path` or its nearest existing parent (what shutil.disk_usage can measure before the path exists)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_space_problem(directory: Path, needed: int, where: str | None = None) -> str | None:
    """Why `directory` cannot take an output (less than `needed` bytes free there), or None. The message names
    `where` (e.g. "the output storage": what a client may read) instead of the directory when given."""
    free = shutil.disk_usage(_existing_ancestor(directory)).free
    if free >= needed:
        return None
    return (f"Not enough free disk space to write the output: {_human(free)} ({free} bytes) free in "
            f"{where or directory}, "
            f"at least {_human(needed)} ({needed} bytes) needed (PARTICALIZE_MIN_FREE_DISK_BYTES). "
            "Free some space there and run the task again.")


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class Storage:
    """Outputs in one fsspec filesystem under `options.url`; output URLs under `options.base_url`."""

    def __init__(self, options: StorageOptions) -> None:
        url = options.url
        try:
            self.fs, root = url_to_fs(url, **options.options)
        except ImportError as exc:
            raise ValueError(f"PARTICALIZE_STORAGE_URL={url} needs a package that is not installed ({exc}); for "
                             "s3:// install the s3 extra: pip install 'particalize[s3]'.") from None
        except ValueError as exc:
            raise ValueError(f"PARTICALIZE_STORAGE_URL={url} is not a usable fsspec URL: {exc}") from None
        self.url = url
        self.root = root.rstrip("/") or root
        self.base_url = options.base_url.rstrip("/")
        self.local_root = Path(self.root).resolve() if isinstance(self.fs, LocalFileSystem) else None

    # --- names and URLs --------------------------------------------------------------------------

    def output_relpath(self, task_uuid: str, name: str = OUTPUT_NAME) -> str:
        if not _UUID.fullmatch(task_uuid) or not _NAME.fullmatch(name):
            raise ValueError(f"not a storable output: {task_uuid}/{name}")
        return f"{task_uuid}/{name}"

    def url_of(self, relpath: str) -> str:
        return f"{self.base_url}/files/{relpath}"

    def _full(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    # --- writing ---------------------------------------------------------------------------------

    def space_problem(self, needed: int) -> str | None:
        """For local storage: why its directory cannot take an output (too little free), or None.
        Object stores report no free space; they are not checked."""
        return None if self.local_root is None else disk_space_problem(self.local_root, needed, "the output storage")

    def put_file(self, local_path: Path, relpath: str) -> None:
        """Store the local file `local_path` as `relpath`, atomically: it is copied to a hidden name in the same
        directory, then moved to its final name (a rename on local and mounted filesystems, a server-side copy on
        object stores). A failure or crash midway leaves nothing at the final name."""
        task_uuid, _, name = relpath.partition("/")
        final = self._full(self.output_relpath(task_uuid, name))  # only <uuid>/<plain name>
        parent, _, name = final.rpartition("/")
        temp = f"{parent}/.{name}.{secrets.token_hex(6)}.part"
        try:
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.put_file(str(local_path), temp)
            self.fs.mv(temp, final)
        except Exception as exc:
            self._remove_quietly(temp)
            log.error("could not store %s in %s: %s", relpath, self.url, exc)
            raise StorageError(f"Could not store the output {relpath} in the output storage: "
                               f"{type(exc).__name__}: {public_text(exc)}".strip()) from exc

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # a leftover hidden temp file is harmless: never served, removed with its task
            log.warning("could not remove the temporary file %s: %s", path, exc)

    # --- reading ---------------------------------------------------------------------------------

    def find_output(self, task_uuid: str, name: str) -> StoredFile | None:
        """The file behind /files/<uuid>/<name>, or None; nothing outside the storage root is reachable."""
        if not _UUID.fullmatch(task_uuid) or not _NAME.fullmatch(name):
            return None
        relpath = f"{task_uuid}/{name}"
        if self.local_root is not None:
            path = (self.local_root / relpath).resolve()
            if path.parent.parent != self.local_root or not path.is_file():
                return None
            return StoredFile(relpath, path.stat().st_size, path)
        full = self._full(relpath)
        self.fs.invalidate_cache(full)  # another replica or a worker may have written it since
        try:
            info = self.fs.info(full)
        except FileNotFoundError:
            return None
        if info.get("type") != "file":
            return None
        size = info.get("size")
        return StoredFile(relpath, int(size) if size is not None else None, None)

    def iter_bytes(self, relpath: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The file's content in chunks (for streaming it from a remote storage)."""
        with self.fs.open(self._full(relpath), "rb") as stream:
            while chunk := stream.read(chunk_bytes):
                yield chunk

    # --- deleting --------------------------------------------------------------------------------

    def discard_task(self, task_uuid: str) -> bool:
        """Remove everything a task wrote (a killed or failed task leaves no partial output). Never raises (a
        worker calls this while ending a task); False, logged, when the storage refused."""
        if not _UUID.fullmatch(task_uuid):
            return True
        try:
            self.fs.rm(self._full(task_uuid), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:
            log.warning("could not remove the files of task %s from %s: %s", task_uuid, self.url, exc)
            return False
        return True

    def remove(self, relpaths: list[str]) -> bool:
        """Remove these outputs (and, locally, their task directory once empty). False, logged, when one could
        not be removed."""
        removed = True
        for relpath in relpaths:
            task_uuid, _, name = relpath.partition("/")
            if not _UUID.fullmatch(task_uuid) or not _NAME.fullmatch(name):
                continue
            try:
                self.fs.rm_file(self._full(relpath))
            except FileNotFoundError:
                pass
            except Exception as exc:
                log.warning("could not remove %s from %s: %s", relpath, self.url, exc)
                removed = False
            if self.local_root is not None:
                with contextlib.suppress(OSError):
                    (self.local_root / task_uuid).rmdir()  # only when empty
        return removed

    # --- uploads ---------------------------------------------------------------------------------

    def upload_url(self, upload_id: str, name: str) -> str:
        return f"{self.base_url}/files/uploads/{upload_id}/{name}"

    def upload_id_from_url(self, url: str) -> str | None:
        """The upload id if `url` is one of this server's upload URLs (read from the store, never fetched)."""
        prefix = f"{self.base_url}/files/uploads/"
        if not url.startswith(prefix):
            return None
        upload_id, _, name = url[len(prefix):].partition("/")
        if _HEX_ID.fullmatch(upload_id) and _NAME.fullmatch(name):
            return upload_id
        return None

    @staticmethod
    def is_upload_id(value: str) -> bool:
        return bool(_HEX_ID.fullmatch(value))
