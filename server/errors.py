"""Application errors in Wiro's shape: HTTP 200 with `result: false`, except auth (401)."""

from __future__ import annotations

import re
from typing import Any

GENERAL = 0
NOT_FOUND = 1
QUEUE_FULL = 96
CONCURRENCY_LIMIT = 96
"""Wiro's code for a concurrency limit (error-reference.md); a full queue shares it."""


class ApiError(Exception):
    """An error a client caused or must handle; routes turn it into `error_body`.

    Wiro answers application errors with HTTP 200 (its official client throws on any non-2xx),
    so `http_status` stays 200 except for authentication failures (401).
    """

    def __init__(self, message: str, code: int = GENERAL, http_status: int = 200) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status


def error_body(errors: list[tuple[int, str]]) -> dict[str, Any]:
    """The JSON body Wiro sends for failed calls."""
    return {"result": False, "errors": [{"code": code, "message": message} for code, message in errors]}


_PATH_LIKE = re.compile(r"(?<![\w.])(?:[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+|~?/(?:[^\s/'\"]+/)*[^\s/'\"]*)")


def redact_paths(text: str) -> str:
    """`text` without file paths or URLs of this server (what a client reads must not map its disks)."""
    return _PATH_LIKE.sub("<path>", text)


def public_text(exc: BaseException) -> str:
    """An exception's first line as a client may read it: an OS error's reason without its file names, any
    other message with paths and URLs redacted."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line
    return redact_paths(text)[:500]
