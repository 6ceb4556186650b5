"""The OpenAPI description of the Wiro routes, served at /openapi.json.

The routes read raw bodies (the seed's JSON labelled multipart, real multipart, forms, JSON), so FastAPI
cannot infer it. The tool inputs are derived from `server.tool_info.input_items`, the same list Tool/Detail
answers, so the description always states this server's limits. Every route also answers application errors
as HTTP 200 with `result: false` (Wiro's contract), 401 for authentication failures.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from server.tool_info import SLUG_OWNER, SLUG_PROJECT, input_items
from server.validation import IMAGE_FIELD, IMAGE_URL_FIELD, MAX_URL_CHARS

JSON = "application/json"
MULTIPART = "multipart/form-data"
FORM = "application/x-www-form-urlencoded"
RUN_PATH = f"/v1/Run/{SLUG_OWNER}/{SLUG_PROJECT}"
_MAX_ENUM = 256
_URL = {"format": "uri", "pattern": "^[hH][tT][tT][pP][sS]?://[^\\s/?#@]+", "maxLength": MAX_URL_CHARS}
"""An http(s) URL to a public host (private addresses are refused unless the operator allows them)."""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _numeric_text(integer: bool) -> dict[str, Any]:
    """Numbers may arrive as text, as the seed sends them ("5.0", "81"); empty text means the default."""
    pattern = r"^\s*(-?[0-9]+(\.0*)?)?\s*$" if integer else r"^\s*(-?[0-9]+(\.[0-9]*)?)?\s*$"
    return {"type": "string", "pattern": pattern}


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
    return {"anyOf": [schema, _numeric_text(integer)]}


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


def _run_body(settings: Any) -> dict[str, Any]:
    properties = {item["id"]: tool_input_schema(item) for item in input_items(settings)}
    properties["callbackUrl"] = {
        "type": "string", **_URL, "description": "Receives the Task/Detail JSON (POST) when the task ends.",
    }
    limits = (
        f"Also: width x height at most {settings.max_pixels} pixels; numFrames x width x height x steps at "
        f"most {settings.max_work} (a size of 0 is checked once the image is read)."
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


def _fields(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


def _body(schema: dict[str, Any], *, multipart: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"required": False, "content": {
        JSON: {"schema": schema}, MULTIPART: {"schema": multipart or schema}, FORM: {"schema": schema},
    }}


_TEXT = {"type": "string", "maxLength": 200}
_INT_OR_TEXT = {"anyOf": [{"type": "integer"}, _numeric_text(True)]}


def _schemas() -> dict[str, Any]:
    text, texts = {"type": "string"}, {"type": "string", "pattern": "^[0-9]+$"}
    output = {"type": "object", "required": ["id", "name", "contenttype", "size", "url"], "properties": {
        "id": text, "name": text, "contenttype": text, "parentid": text, "uuid": text, "size": texts,
        "addedtime": texts, "modifiedtime": texts, "accesskey": text, "foldercount": texts, "filecount": texts,
        "ispublic": {"type": "integer"}, "expiretime": {"type": ["string", "null"]}, "url": text,
    }}
    task_texts = [
        "id", "uuid", "name", "socketaccesstoken", "debugoutput", "debugerror", "starttime", "endtime",
        "elapsedseconds", "status", "cps", "totalcost", "projectid", "modelid", "description", "basemodelid",
        "runtype", "modelfolderid", "modelfileid", "callbackurl", "createtime", "canceltime", "assigntime",
        "accepttime", "preprocessstarttime", "preprocessendtime", "postprocessstarttime", "postprocessendtime",
        "pexit", "categories", "size",
    ]
    task = {"type": "object", "required": [*task_texts, "parameters", "outputs"], "properties": {
        **{name: text for name in task_texts},
        "parameters": {"type": "object"}, "outputs": {"type": "array", "items": _ref("Output")},
        "guestid": {"type": ["string", "null"]}, "marketplaceid": {"type": ["string", "null"]},
    }}
    errors = {"type": "array", "items": _ref("Error")}
    return {
        "Error": {"type": "object", "required": ["code", "message"],
                  "properties": {"code": {"type": "integer"}, "message": text}},
        "ErrorAnswer": {
            "type": "object", "required": ["result", "errors"],
            "properties": {"result": {"const": False}, "errors": {**errors, "minItems": 1}},
            "description": "Code 0: invalid request; 1: no such task or tool; 96: queue full or rate limit.",
        },
        "Output": output,
        "Task": task,
        "RunAnswer": _ok({"taskid": texts, "socketaccesstoken": {"type": "string", "minLength": 30,
                                                                 "maxLength": 30}}),
        "TaskListAnswer": _ok({"tasklist": {"type": "array", "items": _ref("Task")}}),
        "TaskListTotalAnswer": _ok({"total": texts, "tasklist": {"type": "array", "items": _ref("Task")}}),
        "ToolDetailAnswer": _ok({"tool": {"type": "array", "items": {"type": "object"}}}),
        "ToolListAnswer": _ok({"total": texts, "tool": {"type": "array", "items": {"type": "object"}}}),
        "ExploreAnswer": _ok({"explore": {"type": "array", "items": {"type": "object", "required": ["tools"]}}}),
        "UploadAnswer": _ok({"list": {"type": "array", "items": {"type": "object", "required": ["url"]}}}),
        "EmptyAnswer": _ok({}),
    }


def _ok(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["result", "errors", *properties],
        "properties": {"result": {"const": True}, "errors": {"type": "array", "maxItems": 0}, **properties},
    }


def _operation(summary: str, body: dict[str, Any], answer: str) -> dict[str, Any]:
    error = {"content": {JSON: {"schema": _ref("ErrorAnswer")}}}
    return {"post": {
        "summary": summary,
        "requestBody": body,
        "responses": {
            "200": {"description": "The answer, or an application error (result false)",
                    "content": {JSON: {"schema": {"oneOf": [_ref(answer), _ref("ErrorAnswer")]}}}},
            "401": {"description": "Authentication failed", **error},
        },
    }}


def openapi_document(settings: Any) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the Wiro routes for this server's `settings`."""
    task_ids = {"taskid": _TEXT, "tasktoken": _TEXT, "socketaccesstoken": _TEXT}
    paths = {
        RUN_PATH: _operation("Queue a video of the start image", _run_body(settings), "RunAnswer"),
        "/v1/Task/Detail": _operation(
            "A task by taskid or tasktoken", _body(_fields(taskid=_TEXT, tasktoken=_TEXT)), "TaskListTotalAnswer"),
        "/v1/Task/Kill": _operation("Stop a running task", _body(_fields(**task_ids)), "TaskListAnswer"),
        "/v1/Task/Cancel": _operation("Remove a queued task", _body(_fields(**task_ids)), "TaskListAnswer"),
        "/v1/Task/List": _operation(
            "This API key's tasks, newest first", _body(_fields(
                start=_INT_OR_TEXT, limit=_INT_OR_TEXT, type=_TEXT, sort={"enum": ["id", "createtime"]},
                order={"enum": ["DESC", "ASC", "desc", "asc"]}, modelName=_TEXT)),
            "TaskListTotalAnswer"),
        "/v1/Tool/List": _operation(
            "This server's tool, when it answers search (plain words: at least half of them found in its title, "
            "categories, tags, description or example prompts), categories (any) and slugowner",
            _body(_fields(start=_INT_OR_TEXT, limit=_INT_OR_TEXT, search=_TEXT, slugowner=_TEXT, sort=_TEXT,
                          categories={"anyOf": [{"type": "array", "items": _TEXT}, _TEXT]})),
            "ToolListAnswer"),
        "/v1/Tool/Explore": _operation(
            "The catalogue: one category holding this server's tool (narrowed by search or categories, as Tool/List)",
            _body(_fields(search=_TEXT, categories={"anyOf": [{"type": "array", "items": _TEXT}, _TEXT]})),
            "ExploreAnswer"),
        "/v1/Tool/Detail": _operation(
            "The tool's inputs, defaults and limits", _body(_fields(slugowner=_TEXT, slugproject=_TEXT)),
            "ToolDetailAnswer"),
        "/v1/File/Upload": _operation(
            "Store an input image; answers a URL usable as inputImageUrl",
            {"required": True, "content": {MULTIPART: {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}},
            }}}},
            "UploadAnswer"),
        "/v1/Task/InputOutputDelete": _operation(
            "Delete a finished task's files", _body(_fields(**task_ids)), "EmptyAnswer"),
    }
    keyed = bool(getattr(settings, "api_keys", None) or getattr(settings, "api_keys_file", None))
    try:
        version = metadata.version("particalize")
    except metadata.PackageNotFoundError:
        version = "0"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"{SLUG_OWNER}/{SLUG_PROJECT} (Wiro-compatible)",
            "version": version,
            "description": "Application errors answer HTTP 200 with result false; authentication failures 401; "
                           "unknown routes 404. Every body may be JSON, multipart/form-data or a urlencoded form.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "nonce": {"type": "apiKey", "in": "header", "name": "x-nonce"},
                "signature": {"type": "apiKey", "in": "header", "name": "x-signature",
                              "description": "hex(HMAC-SHA256(key=API_KEY, message=API_SECRET + NONCE))"},
            },
        },
        "security": [{"apiKey": [], "nonce": [], "signature": []}, {"apiKey": []}, *([] if keyed else [{}])],
    }
