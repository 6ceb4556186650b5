"""Request bodies in every form Wiro clients send, read into one flat field map.

The seed's curl sends a JSON text labelled `multipart/form-data` with no boundary; the official
client sends `application/json`; browsers and SDKs send real multipart (with file parts) or
urlencoded forms. The label is a hint only: a body that is clearly JSON is read as JSON.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from server.errors import ApiError

_ACCEPTED = (
    "send a JSON object (Content-Type: application/json), multipart/form-data or application/x-www-form-urlencoded"
)
_MAX_FIELDS = 1000
_MAX_DEPTH = 32
"""Wiro bodies are flat; a JSON value nested deeper is refused before anything walks it recursively."""


@dataclass
class UploadedFile:
    filename: str
    content_type: str
    data: bytes


@dataclass
class RequestFields:
    values: dict[str, Any] = field(default_factory=dict)  # JSON values as sent; form values are str
    files: dict[str, UploadedFile] = field(default_factory=dict)


async def parse_fields(request: Request, body: bytes, max_bytes: int) -> RequestFields:
    """The fields of `body` (read with `read_body`), in the form its Content-Type and content say; ApiError (code 0)
    saying what to send instead."""
    if not body.strip():
        return RequestFields()
    media_type, params = parse_options_header(request.headers.get("content-type"))
    if media_type == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if boundary and b"--" + boundary in body:
            return await _parse_multipart(request, body, boundary, max_bytes)
        if _looks_like_json(body):
            return _parse_json(body)
        raise ApiError(f"The multipart/form-data body does not match its boundary; {_ACCEPTED}.")
    if media_type == b"application/x-www-form-urlencoded" and not _looks_like_json(body):
        return _parse_urlencoded(body)
    return _parse_json(body)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(f"Request body is larger than {max_bytes} bytes.")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, read chunk by chunk so an oversized one is refused without buffering it all."""
    declared = (request.headers.get("content-length") or "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _looks_like_json(body: bytes) -> bool:
    return body.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"[")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _parse_json(body: bytes) -> RequestFields:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ApiError(f"The request body is not valid UTF-8; {_ACCEPTED}.") from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ApiError(f"The request body is not valid JSON ({exc}); {_ACCEPTED}.") from exc
    except RecursionError:  # nested deeper than the parser's stack
        raise _too_deep() from None
    if _nested_deeper_than(value, _MAX_DEPTH):
        raise _too_deep()
    if not isinstance(value, dict):
        raise ApiError(
            f'The request body must be a JSON object such as {{"prompt": "..."}}, not a JSON {type(value).__name__}.'
        )
    return RequestFields(values=value)


def _too_deep() -> ApiError:
    return ApiError(f"The request body is nested more than {_MAX_DEPTH} levels deep; send a flat JSON object.")


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Iteratively, so that a deep value cannot exhaust the stack here (or later, where it is printed)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _parse_urlencoded(body: bytes) -> RequestFields:
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            errors="strict",
            max_num_fields=_MAX_FIELDS,
        )
    except UnicodeDecodeError as exc:
        raise ApiError(f"The form body is not valid UTF-8; {_ACCEPTED}.") from exc
    except ValueError as exc:
        raise ApiError(f"The form body could not be read ({exc}).") from exc
    return RequestFields(values=dict(pairs))


async def _single_chunk(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def _parse_multipart(request: Request, body: bytes, boundary: bytes, max_bytes: int) -> RequestFields:
    if b"--" + boundary + b"--" not in body:
        # python-multipart drops a truncated last part silently; a cut-off upload must not pass.
        raise ApiError(f"The multipart/form-data body is incomplete (no closing boundary); {_ACCEPTED}.")
    parser = MultiPartParser(
        request.headers,
        _single_chunk(body),
        max_files=_MAX_FIELDS,
        max_fields=_MAX_FIELDS,
        max_part_size=max_bytes,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(f"The multipart/form-data body could not be read ({exc.message}); {_ACCEPTED}.") from exc
    fields = RequestFields()
    try:
        for name, item in form.multi_items():
            fields.values.pop(name, None)
            fields.files.pop(name, None)
            if isinstance(item, UploadFile):
                data = await item.read()
                if not item.filename and not data:
                    fields.values[name] = ""  # a file input left empty, as browsers send it
                else:
                    content_type = item.content_type or "application/octet-stream"
                    fields.files[name] = UploadedFile(item.filename or "", content_type, data)
            else:
                fields.values[name] = item
    finally:
        await form.close()
    return fields
