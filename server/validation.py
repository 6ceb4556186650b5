"""A Run request's fields checked before anything is stored, into the task's typed record (server.task_record):
tool inputs, start image, callbackUrl, the request's own LoRAs (server.request_loras).

A bad request is refused here with the field it is about (code 0) and creates nothing. An image sent with the Run
is decoded now, once (fail fast; its format and size taken from that decode), one uploaded earlier to File/Upload
has its header read; either way the parameters are resolved now (pipeline.resolve: the size the image implies, held
to every limit, the mode, the seed) and stored with the task, which the worker runs as they are. An image URL is
checked now (scheme, public address) and fetched by the worker at task_preprocess_start, which resolves them then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import InvalidParameter
from pipeline.images import decode_image_with_format, image_size
from pipeline.params import GenerationParams, Limits, ResolvedParams, parse_params
from pipeline.resolve import Modes, resolve_request
from server.bodies import RequestFields, UploadedFile
from server.errors import ApiError
from server.limits import RequestLimits
from server.netguard import PrivateAddress, UnresolvableHost, UnsafeUrl, check_url
from server.request_loras import parse_request_loras
from server.storage import Storage, safe_name
from server.store import NewUpload, new_id
from server.store.uploads import Uploads
from server.task_record import ImageSource, TaskRecord
from server.tool_info import IMAGE_FIELD, IMAGE_URL_FIELD, PARTICALIZE, TOOL_INPUTS, Tool

__all__ = ["IMAGE_FIELD", "IMAGE_URL_FIELD", "MAX_URL_CHARS", "RunRequest", "check_public_url",
           "check_upload", "parse_run"]

MAX_URL_CHARS = 2048



@dataclass(frozen=True)
class RunRequest:
    record: TaskRecord
    new_upload: NewUpload | None
    """The image sent with this request, stored with the task."""


def _as_text(name: str, value: Any) -> str:
    if isinstance(value, bool | dict | list):
        raise ApiError(f"Request parameter [{name}] must be a text or a number, not {type(value).__name__}.")
    return "" if value is None else str(value)


def _with_tool(values: dict[str, Any], tool: Tool) -> dict[str, Any]:
    """The tool's own defaults in place of the inputs left out (or sent empty, as multipart clients do)."""
    return {**values, **{k: v for k, v in tool.defaults.items() if not _as_text(k, values.get(k)).strip()}}


def _triggered(params: GenerationParams, tool: Tool) -> GenerationParams:
    """The prompt with the tool's trigger word before it, unless it is in the prompt already."""
    prompt = tool.triggered(params.prompt)
    return params if prompt == params.prompt else params.model_copy(update={"prompt": prompt})


def parse_run(fields: RequestFields, options: RequestLimits, storage: Storage, uploads: Uploads,
              owner: str | None = None, tool: Tool = PARTICALIZE) -> RunRequest:
    values = {k: v for k, v in fields.values.items() if k in TOOL_INPUTS or k == "callbackUrl"}
    inputs = {k: _as_text(k, v) for k, v in values.items() if k in TOOL_INPUTS}
    try:  # the seed is fixed now: it is recorded
        sent = parse_params(_with_tool(values, tool), options.params).with_seed()
    except InvalidParameter as exc:
        raise ApiError(str(exc)) from None
    params = _triggered(sent, tool)

    new_upload: NewUpload | None = None
    size: tuple[int, int] | None = None  # the image's, when it is here already (else the worker fetches it)
    upload = fields.files.get(IMAGE_FIELD) or fields.files.get(IMAGE_URL_FIELD)
    if upload is not None:
        new_upload, size = _checked_upload(upload, options.max_image_bytes, IMAGE_FIELD)
        image = ImageSource(url=storage.upload_url(new_upload.id, new_upload.name), upload_id=new_upload.id,
                            attached=True)
    else:
        field = IMAGE_URL_FIELD if inputs.get(IMAGE_URL_FIELD, "").strip() else IMAGE_FIELD
        image_url = inputs.get(field, "").strip()
        if not image_url:
            raise ApiError(
                f"Request parameter [{IMAGE_URL_FIELD}] is required: send the start image's http(s) URL in "
                f"{IMAGE_URL_FIELD}, or the image file as a multipart part named {IMAGE_FIELD}."
            )
        upload_id = storage.upload_id_from_url(image_url)
        if upload_id is not None:
            stored = uploads.get(upload_id)
            if stored is None:
                raise ApiError(f"Request parameter [{field}] names an upload that does not exist: {image_url}")
            size = image_size(stored.data)  # None: unreadable here; the worker decodes it and says why
        else:
            check_public_url(field, image_url, options.allow_private_urls)
        image = ImageSource(url=image_url, upload_id=upload_id)
    resolved = None if size is None else resolve_for_image(params, size, options.params, options.modes)

    callback_url = _as_text("callbackUrl", values.get("callbackUrl")).strip()
    if callback_url:
        check_public_url("callbackUrl", callback_url, options.allow_private_urls)
    loras = parse_request_loras(fields, tool, options)
    trigger = tool.trigger if params.prompt != sent.prompt else ""  # the generator's prompt has it, not `parameters`
    record = TaskRecord(params=params, inputs=inputs, image=image, callback_url=callback_url, owner=owner,
                        resolved=resolved, tool=tool.slug, trigger=trigger,
                        loras=loras)
    return RunRequest(record, new_upload)


def resolve_for_image(params: GenerationParams, size: tuple[int, int], limits: Limits,
                      modes: Modes) -> ResolvedParams:
    """The task's one resolution, now that the image's size is known; refused (code 0) when the size it implies
    breaks a limit. The inputs recorded stay as sent; the worker runs the resolved value as it is."""
    try:
        return resolve_request(params, size, limits, modes)
    except InvalidParameter as exc:
        raise ApiError(str(exc)) from None


def check_public_url(field: str, url: str, allow_private: bool) -> None:
    if len(url) > MAX_URL_CHARS:
        raise ApiError(f"Request parameter [{field}] must be at most {MAX_URL_CHARS} characters long, got "
                       f"{len(url)} characters.")
    if not url.lower().startswith(("http://", "https://")):
        raise ApiError(f"Request parameter [{field}] must be an http(s) URL, got {url[:60]!r}.")
    try:
        check_url(url, allow_private)
    except UnresolvableHost:
        host = urlsplit(url).hostname or url
        raise ApiError(
            f"Request parameter [{field}] must be a URL whose host resolves, got {url[:100]!r}: the host {host!r} "
            "could not be resolved from this server; check its spelling (a name only your own network knows "
            "cannot be reached from here)."
        ) from None
    except PrivateAddress as exc:
        raise ApiError(
            f"Request parameter [{field}] must be a public http(s) URL, got {url[:100]!r}: {exc} (an operator can "
            "allow private addresses with PARTICALIZE_ALLOW_PRIVATE_URLS=1)."
        ) from None
    except UnsafeUrl as exc:
        raise ApiError(f"Request parameter [{field}] must be a plain http(s) URL, got {url[:100]!r}: {exc}") from None


def check_upload(upload: UploadedFile, max_bytes: int, field: str) -> NewUpload:
    """An uploaded image within the size limit that decodes; else ApiError naming the field."""
    return _checked_upload(upload, max_bytes, field)[0]


def _checked_upload(upload: UploadedFile, max_bytes: int, field: str) -> tuple[NewUpload, tuple[int, int]]:
    """`check_upload`, and the image's (width, height) from the same decode."""
    if len(upload.data) > max_bytes:
        raise ApiError(
            f"Request parameter [{field}] must be at most {max_bytes} bytes, got {len(upload.data)} bytes."
        )
    try:
        image, fmt = decode_image_with_format(upload.data, field=field)
    except InvalidParameter as exc:
        raise ApiError(str(exc)) from None
    fmt = fmt.lower()
    name = safe_name(upload.filename, f"{field}.{fmt}")
    return NewUpload(new_id(), name, f"image/{fmt}", upload.data), image.size
