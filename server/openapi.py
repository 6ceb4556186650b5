"""The OpenAPI description of the Wiro routes, served at /openapi.json: written by FastAPI from the routes and their
response models (`server.answers`), with what it cannot infer added here.

The routes read raw bodies (the seed's JSON labelled multipart, real multipart, forms, JSON), so FastAPI does not
see a body parameter: each route names its request fields as a pydantic model (`operation`), whose schema is
offered in the three encodings. Run's fields are the tool inputs, derived from `server.tool_info.input_items`, the
same list Tool/Detail answers, so the description always states this server's limits. Every route also answers
application errors as HTTP 200 with `result: false` (Wiro's contract), 401 for authentication failures.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from server.answers import ErrorAnswer
from server.options import ServerOptions
from server.tool_info import IMAGE_FIELD, IMAGE_URL_FIELD, SLUG_OWNER, SLUG_PROJECT, input_items
from server.validation import MAX_URL_CHARS

if TYPE_CHECKING:
    from fastapi import FastAPI

JSON = "application/json"
MULTIPART = "multipart/form-data"
FORM = "application/x-www-form-urlencoded"
RUN_PATH = f"/v1/Run/{SLUG_OWNER}/{SLUG_PROJECT}"
_MAX_ENUM = 256
_INTEGER_TEXT = r"^\s*(-?[0-9]+(\.0*)?)?\s*$"
_NUMBER_TEXT = r"^\s*(-?[0-9]+(\.[0-9]*)?)?\s*$"
_URL = {"format": "uri", "pattern": "^[hH][tT][tT][pP][sS]?://[^\\s/?#@]+", "maxLength": MAX_URL_CHARS}
"""An http(s) URL to a public host (private addresses are refused unless the operator allows them)."""

# --- request fields: what each route reads from its body, in any of the three encodings ---------------------------

Text = Annotated[str, Field(max_length=200)]
WholeNumber = int | Annotated[str, Field(pattern=_INTEGER_TEXT)]
"""Numbers may arrive as text, as the seed sends them ("81"); empty text means the default."""
Categories = list[Text] | Text
"""A list of category names, or one text ("a,b", or a JSON array sent in a form)."""


class DetailFields(BaseModel):
    taskid: Text = ""
    tasktoken: Text = ""


class TaskFields(BaseModel):
    taskid: Text = ""
    tasktoken: Text = ""
    socketaccesstoken: Text = ""


class ListFields(BaseModel):
    start: WholeNumber = 0
    limit: WholeNumber = 20
    type: Text = "model"
    sort: Literal["id", "createtime"] = "id"
    order: Literal["DESC", "ASC", "desc", "asc"] = "DESC"
    modelName: Text = ""  # noqa: N815  (Wiro's name)


class ToolFields(BaseModel):
    slugowner: Text = SLUG_OWNER
    slugproject: Text = SLUG_PROJECT


class ToolListFields(BaseModel):
    start: WholeNumber = 0
    limit: WholeNumber = 20
    search: Text = ""
    slugowner: Text = ""
    sort: Text = ""
    categories: Categories = Field(default_factory=list)


class ExploreFields(BaseModel):
    search: Text = ""
    categories: Categories = Field(default_factory=list)


class UploadFields(BaseModel):
    file: bytes
    """The image as a multipart file part."""


def _body(schema: dict[str, Any], *, multipart: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"required": False, "content": {
        JSON: {"schema": schema}, MULTIPART: {"schema": multipart or schema}, FORM: {"schema": schema},
    }}


def operation(summary: str, answer: type[BaseModel], fields: type[BaseModel] | None = None) -> dict[str, Any]:
    """The keyword arguments of a Wiro route's decorator: its answer (or an application error) at HTTP 200, an
    authentication failure at 401, and its request `fields` in JSON, multipart and form encoding (Run's are added
    by `openapi_document`, from this server's limits)."""
    kwargs: dict[str, Any] = {
        "summary": summary,
        "response_model": answer | ErrorAnswer,
        "response_description": "The answer, or an application error (result false)",
        "responses": {401: {"model": ErrorAnswer, "description": "Authentication failed"}},
    }
    if fields is UploadFields:
        kwargs["openapi_extra"] = {"requestBody": {"required": True, "content": {
            MULTIPART: {"schema": fields.model_json_schema()}}}}
    elif fields is not None:
        kwargs["openapi_extra"] = {"requestBody": _body(fields.model_json_schema())}
    return kwargs


# --- Run's fields: the tool inputs, with this server's limits ----------------------------------------------------

def _number_schema(item: dict[str, Any]) -> dict[str, Any]:
    integer = item["type"] == "number"
    schema: dict[str, Any] = {"type": "integer" if integer else "number"}
    low, high, step = item.get("min"), item.get("max"), item.get("step")
    if integer and step and step > 1 and low is not None and high is not None:
        if low % step == 0:
            schema["multipleOf"] = step  # width/height: 0 or a multiple of 16
        elif (high - low) // step < _MAX_ENUM:
            schema["enum"] = list(range(low, high + 1, step))  # numFrames: 4*n + 1
    if low is not None:
        schema["minimum"] = low
    if high is not None:
        schema["maximum"] = high
    return {"anyOf": [schema, {"type": "string", "pattern": _INTEGER_TEXT if integer else _NUMBER_TEXT}]}


def tool_input_schema(item: dict[str, Any]) -> dict[str, Any]:
    """One Tool/Detail input item as a JSON Schema."""
    if item["type"] in ("number", "float"):
        schema = _number_schema(item)
    else:
        schema = {"type": "string"}
        if item["id"] == IMAGE_URL_FIELD:
            schema.update(_URL)
        elif item.get("max") is not None:
            schema["maxLength"] = item["max"]
    description = item["description"] + (f" ({item['note']})" if item.get("note") else "")
    return {**schema, "description": description, "default": item["default"]}


def _run_body(options: ServerOptions) -> dict[str, Any]:
    properties = {item["id"]: tool_input_schema(item) for item in input_items(options.tool, options.limits)}
    properties["callbackUrl"] = {
        "type": "string", **_URL, "description": "Receives the Task/Detail JSON (POST) when the task ends.",
    }
    limits = (
        f"Also: width x height at most {options.limits.params.max_pixels} pixels; numFrames x width x height x "
        f"steps at most {options.limits.params.max_work} (a size of 0 is checked once the image is read)."
    )
    as_json = {"type": "object", "properties": properties, "description": f"Send {IMAGE_URL_FIELD} (or the URL in "
               f"{IMAGE_FIELD}). {limits}"}
    with_file = {
        "type": "object",
        "properties": {**properties, IMAGE_FIELD: {"type": "string", "format": "binary",
                                                   "description": "The start image as a file part."}},
        "description": f"The image as a file part {IMAGE_FIELD}, or its URL in {IMAGE_URL_FIELD}. {limits}",
    }
    return _body(as_json, multipart=with_file)


# --- the document --------------------------------------------------------------------------------------------------

SECURITY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    "nonce": {"type": "apiKey", "in": "header", "name": "x-nonce"},
    "signature": {"type": "apiKey", "in": "header", "name": "x-signature",
                  "description": "hex(HMAC-SHA256(key=API_KEY, message=API_SECRET + NONCE))"},
}


def openapi_document(app: FastAPI, options: ServerOptions) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the Wiro routes (the others are left out of the schema where they are
    declared) for this server's `options`, made once."""
    if app.openapi_schema is None:
        try:
            version = metadata.version("particalize")
        except metadata.PackageNotFoundError:
            version = "0"
        document = get_openapi(
            title=f"{SLUG_OWNER}/{SLUG_PROJECT} (Wiro-compatible)", version=version, routes=app.routes,
            description="Application errors answer HTTP 200 with result false; authentication failures 401; unknown "
                        "routes 404. Every body may be JSON, multipart/form-data or a urlencoded form.",
        )
        document["paths"][RUN_PATH]["post"]["requestBody"] = _run_body(options)
        document["components"]["securitySchemes"] = SECURITY_SCHEMES
        keyed = bool(options.auth.keys)  # without keys, unsigned requests are answered too
        document["security"] = [{"apiKey": [], "nonce": [], "signature": []}, {"apiKey": []}, *([] if keyed else [{}])]
        app.openapi_schema = document
    return app.openapi_schema
