"""File/Upload (an input image, answered with a URL usable as inputImageUrl) and GET /files/... (outputs
and uploads, with their content type; only plain names inside the storage are reachable)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from server.answers import UploadAnswer
from server.bodies import RequestFields
from server.errors import ApiError, error_body
from server.openapi import UploadFields, operation
from server.routes.common import answer, services_of
from server.services import Services
from server.storage import content_type_of
from server.validation import check_upload

log = logging.getLogger("particalize.files")
router = APIRouter()

UPLOAD_FIELDS = ("file", "inputImage")


@router.post("/v1/File/Upload", **operation("Store an input image; answers a URL usable as inputImageUrl", UploadAnswer,
                                            UploadFields))
async def upload(request: Request) -> JSONResponse:
    def handler(services: Services, owner: str | None, fields: RequestFields) -> dict[str, Any]:
        part = next((fields.files[name] for name in UPLOAD_FIELDS if name in fields.files), None)
        if part is None:
            raise ApiError("Request parameter [file] is required: send the image as a multipart/form-data "
                           "file part named file.")
        checked = check_upload(part, services.options.limits.max_image_bytes, "file")
        row = services.store.uploads.add(checked, owner)
        return {"result": True, "errors": [], "list": [{
            "id": row.id,
            "name": row.name,
            "contenttype": row.contenttype,
            "size": str(row.size),
            "parentid": "0",
            "addedtime": str(int(row.addedtime)),
            "accesskey": row.accesskey,
            "url": services.storage.upload_url(row.id, row.name),
        }]}

    return await answer(request, handler)


def _not_found() -> JSONResponse:
    return JSONResponse(error_body([(0, "Error parsing url.")]), status_code=404)


@router.api_route("/files/uploads/{upload_id}/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def uploaded_file(request: Request, upload_id: str, name: str) -> Response:
    services = services_of(request)
    if not services.storage.is_upload_id(upload_id):
        return _not_found()
    row = await run_in_threadpool(services.store.uploads.get, upload_id)
    if row is None or row.name != name:
        return _not_found()
    return Response(row.data, media_type=row.contenttype)


@router.api_route("/files/{task_uuid}/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def output_file(request: Request, task_uuid: str, name: str) -> Response:
    """An output from the storage: a local file as a FileResponse (ranges, HEAD), a remote one streamed."""
    storage = services_of(request).storage
    try:
        found = await run_in_threadpool(storage.find_output, task_uuid, name)
    except Exception as exc:  # the storage is unreachable or refuses: say so, never a 500
        log.warning("could not look up %s/%s in %s: %s", task_uuid, name, storage.url, exc)
        return _storage_unavailable()
    if found is None:
        return _not_found()
    media_type = content_type_of(name)
    if found.local_path is not None:
        return FileResponse(found.local_path, media_type=media_type)
    headers = {"content-length": str(found.size)} if found.size is not None else {}
    if request.method == "HEAD":
        return Response(media_type=media_type, headers=headers)
    return StreamingResponse(storage.iter_bytes(found.relpath), media_type=media_type, headers=headers)


def _storage_unavailable() -> JSONResponse:
    return JSONResponse(error_body([(0, "The output storage is unavailable right now; try again shortly.")]),
                        status_code=503)
