"""A Run request's fields checked before anything is stored: tool inputs, start image, callbackUrl.

A bad request is refused here with the field it is about (code 0) and creates nothing. An uploaded
image (sent with the Run or earlier to File/Upload) is decoded now (fail fast), and a width/height left to it
(0) is resolved now and held to every size limit; an image URL is checked now (scheme, public address) and
fetched by the worker at task_preprocess_start, which then does the same for its size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from pipeline.errors import InvalidParameter
from pipeline.images import decode_image, image_size
from pipeline.params import GenerationParams, Limits, parse_params, size_for_image
from server.bodies import RequestFields, UploadedFile
from server.errors import ApiError
from server.netguard import PrivateAddress, UnresolvableHost, UnsafeUrl, check_url
from server.storage import Storage, safe_name
from server.store import NewUpload, TaskStore, new_id
from server.tool_info import IMAGE_FIELD, IMAGE_URL_FIELD, TOOL_INPUTS

MAX_URL_CHARS = 2048


@dataclass(frozen=True)
class RunRequest:
    params: GenerationParams
    parameters: dict[str, str]
    """Recorded with the task (every value a string): the tool inputs as sent, plus the default of each one not
    sent and the seed chosen now; width/height 0 are recorded as used by the worker once it has read the image
    (an image sent or uploaded is already checked here with the size it implies)."""
    image_url: str
    upload_id: str | None
    """Set when the image is in the store: sent with this request (`new_upload`) or via File/Upload."""
    new_upload: NewUpload | None
    callback_url: str


def _as_text(name: str, value: Any) -> str:
    if isinstance(value, bool | dict | list):
        raise ApiError(f"Request parameter [{name}] must be a text or a number, not {type(value).__name__}.")
    return "" if value is None else str(value)


def parse_run(fields: RequestFields, settings: Any, storage: Storage, store: TaskStore) -> RunRequest:
    values = {k: v for k, v in fields.values.items() if k in TOOL_INPUTS or k == "callbackUrl"}
    parameters = {k: _as_text(k, v) for k, v in values.items() if k in TOOL_INPUTS}
    limits = settings.params
    try:
        params = parse_params(values, limits).with_seed()
    except InvalidParameter as exc:
        raise ApiError(str(exc)) from None
    for name, value in params.wiro_inputs().items():  # what will run: defaults and the seed are recorded too
        if value is not None and not parameters.get(name, "").strip():  # an unset mode: the worker records it
            parameters[name] = str(value)

    upload = fields.files.get(IMAGE_FIELD) or fields.files.get(IMAGE_URL_FIELD)
    image_data: bytes | None = None  # the image, when it is here already (else the worker fetches it)
    if upload is not None:
        new_upload = check_upload(upload, settings, IMAGE_FIELD)
        image_url = storage.upload_url(new_upload.id, new_upload.name)
        parameters.pop(IMAGE_URL_FIELD, None)
        parameters[IMAGE_FIELD] = image_url
        upload_id: str | None = new_upload.id
        image_data = new_upload.data
    else:
        new_upload = None
        field = IMAGE_URL_FIELD if parameters.get(IMAGE_URL_FIELD, "").strip() else IMAGE_FIELD
        image_url = parameters.get(field, "").strip()
        if not image_url:
            raise ApiError(
                f"Request parameter [{IMAGE_URL_FIELD}] is required: send the start image's http(s) URL in "
                f"{IMAGE_URL_FIELD}, or the image file as a multipart part named {IMAGE_FIELD}."
            )
        upload_id = storage.upload_id_from_url(image_url)
        if upload_id is not None:
            stored = store.get_upload(upload_id)
            if stored is None:
                raise ApiError(f"Request parameter [{field}] names an upload that does not exist: {image_url}")
            image_data = stored.data
        else:
            check_public_url(field, image_url, settings)
    if image_data is not None:
        check_size_for_image(params, image_data, limits)

    callback_url = _as_text("callbackUrl", values.get("callbackUrl")).strip()
    if callback_url:
        check_public_url("callbackUrl", callback_url, settings)
    return RunRequest(params, parameters, image_url, upload_id, new_upload, callback_url)


def check_size_for_image(params: GenerationParams, image_data: bytes, limits: Limits) -> None:
    """A width/height left to the image (0) resolved now that the image is here, and refused (code 0) when the size
    it implies breaks a limit. What is recorded stays as sent: the worker resolves it again, the same way."""
    size = image_size(image_data)
    if size is None:  # unreadable here: the worker decodes it and says why
        return
    try:
        size_for_image(params, size, limits)
    except InvalidParameter as exc:
        raise ApiError(str(exc)) from None


def check_public_url(field: str, url: str, settings: Any) -> None:
    if len(url) > MAX_URL_CHARS:
        raise ApiError(f"Request parameter [{field}] must be at most {MAX_URL_CHARS} characters long, got "
                       f"{len(url)} characters.")
    if not url.lower().startswith(("http://", "https://")):
        raise ApiError(f"Request parameter [{field}] must be an http(s) URL, got {url[:60]!r}.")
    try:
        check_url(url, settings.allow_private_urls)
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


def check_upload(upload: UploadedFile, settings: Any, field: str) -> NewUpload:
    """An uploaded image within the size limit that decodes; else ApiError naming the field."""
    if len(upload.data) > settings.max_image_bytes:
        raise ApiError(
            f"Request parameter [{field}] must be at most {settings.max_image_bytes} bytes, got {len(upload.data)} "
            "bytes."
        )
    try:
        image = decode_image(upload.data, field=field)
    except InvalidParameter as exc:
        raise ApiError(str(exc)) from None
    del image
    fmt = _format_of(upload.data)
    name = safe_name(upload.filename, f"{field}.{fmt}")
    return NewUpload(new_id(), name, f"image/{fmt}", upload.data)


def _format_of(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as probe:
        return (probe.format or "png").lower()
