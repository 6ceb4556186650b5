"""Where output files live and the URLs they are served at.

Outputs: <outputs_dir>/<task uuid>/<name>, written atomically (a temp name, then a rename), served at
<public base URL>/files/<task uuid>/<name>. Uploaded inputs live in the database and are served at
<public base URL>/files/uploads/<upload id>/<name>.
"""

from __future__ import annotations

import contextlib
import mimetypes
import re
import shutil
from pathlib import Path
from typing import Any

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

OUTPUT_NAME = "0.mp4"
OUTPUT_TYPE = "video/mp4"


def base_url_of(settings: Any) -> str:
    """settings.public_base_url, or http://host:port of this server."""
    if settings.public_base_url:
        return str(settings.public_base_url).rstrip("/")
    host = settings.host
    if host in ("", "0.0.0.0", "::"):
        host = settings.node_name
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def safe_name(name: str, default: str) -> str:
    """A file name that is one plain path segment (no directories, no leading dot)."""
    cleaned = _UNSAFE_CHARS.sub("-", Path(name or "").name).strip("-.")[:100]
    return cleaned if cleaned and _NAME.fullmatch(cleaned) else default


def content_type_of(name: str) -> str:
    if name.endswith(".mp4"):
        return OUTPUT_TYPE
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


class Storage:
    def __init__(self, outputs_dir: Path, base_url: str) -> None:
        self.root = Path(outputs_dir).resolve()
        self.base_url = base_url.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Any) -> Storage:
        return cls(settings.outputs_dir, base_url_of(settings))

    # --- outputs ---------------------------------------------------------------------------------

    def output_relpath(self, task_uuid: str, name: str = OUTPUT_NAME) -> str:
        if not _UUID.fullmatch(task_uuid) or not _NAME.fullmatch(name):
            raise ValueError(f"not a storable output: {task_uuid}/{name}")
        return f"{task_uuid}/{name}"

    def path_of(self, relpath: str) -> Path:
        return self.root / relpath

    def url_of(self, relpath: str) -> str:
        return f"{self.base_url}/files/{relpath}"

    def find_output(self, task_uuid: str, name: str) -> Path | None:
        """The file behind /files/<uuid>/<name>, or None; nothing outside the outputs directory is reachable."""
        if not _UUID.fullmatch(task_uuid) or not _NAME.fullmatch(name):
            return None
        path = (self.root / task_uuid / name).resolve()
        if path.parent.parent != self.root or not path.is_file():
            return None
        return path

    def discard_task(self, task_uuid: str) -> None:
        """Remove everything a task wrote (a killed or failed task leaves no partial output)."""
        if _UUID.fullmatch(task_uuid):
            shutil.rmtree(self.root / task_uuid, ignore_errors=True)

    def remove(self, relpaths: list[str]) -> None:
        for relpath in relpaths:
            path = self.root / relpath
            if path.resolve().is_relative_to(self.root):
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # only when empty

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

    @staticmethod
    def is_file_name(value: str) -> bool:
        return bool(_NAME.fullmatch(value))
