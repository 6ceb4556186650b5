"""Property tests of the whole API, in process: whatever a client sends to any Wiro route, the server answers
in Wiro's shapes, never 5xx, creates a task only for a Run it accepts, and stays up.

Two sources of requests: schemathesis draws bodies that conform to /openapi.json and bodies that violate it
(the tool inputs there come from Tool/Detail's schema); hypothesis draws the rest: random JSON, wrong types,
huge numbers, NaN and infinity in every spelling, unicode, nested objects, random bytes under random content
types, and missing or garbled auth headers. Nothing leaves the process: every host name "resolves" to one public
address without a lookup (so Runs with image URLs are accepted, as in production), and no socket may connect
(a task accepted with a callbackUrl and then cancelled would otherwise be reported there). The database is
SQLite in a temporary directory.

Examples per test: PARTICALIZE_FUZZ_EXAMPLES (default small, so the file runs in well under a minute); runs are
derandomized unless PARTICALIZE_FUZZ_RANDOM=1.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import requests
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from particalize.compose_server import build_app
from server.auth import sign
from server.openapi import RUN_PATH
from tests.conftest import make_settings
from tests.images import png_bytes

KEY, SECRET, PLAIN_KEY = "fuzz-key", "fuzz-secret", "fuzz-plain"
ROUTES = [RUN_PATH, "/v1/Task/Detail", "/v1/Task/Kill", "/v1/Task/Cancel", "/v1/Task/List", "/v1/Tool/Detail",
          "/v1/File/Upload", "/v1/Task/InputOutputDelete", "/v1/Tool/List", "/v1/Tool/Explore"]
EXAMPLES = int(os.environ.get("PARTICALIZE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None,
    derandomize=os.environ.get("PARTICALIZE_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
_nonces = itertools.count(int(time.time() * 1000))


# --- the server under test, with no way out to the network --------------------------------------------------------


PUBLIC_ADDRESS = "93.184.216.34"


def _public_dns(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
    """Every name resolves to one public address (so that Runs with image URLs are accepted), literals to
    themselves; nothing is looked up."""
    name = host.decode() if isinstance(host, bytes) else str(host)
    try:
        address = ipaddress.ip_address(name.strip("[]").split("%")[0])
    except ValueError:
        address = ipaddress.ip_address(PUBLIC_ADDRESS)
    if address.version == 6:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (str(address), port or 0, 0, 0))]
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (str(address), port or 0))]


def _no_connections(sock: socket.socket, address: Any) -> None:
    raise ConnectionRefusedError(f"the fuzz tests open no connections (asked for {address!r})")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = Path(tmp_path_factory.mktemp("fuzz"))
    app_settings = make_settings(
        tmp, f"sqlite:///{tmp / 'tasks.db'}", api_keys=f"{KEY}:{SECRET},{PLAIN_KEY}:",
        max_body_bytes=64 * 1024, max_image_bytes=32 * 1024, callback_attempts=1,
        nonce_unit="auto",  # the opt-in freshness window, so that a stale nonce is among the refused headers
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", _public_dns)
        patch.setattr(socket.socket, "connect", _no_connections)
        with TestClient(build_app(app_settings), raise_server_exceptions=False) as test_client:
            yield test_client


def signed() -> dict[str, str]:
    nonce = str(next(_nonces))
    return {"x-api-key": KEY, "x-nonce": nonce, "x-signature": sign(KEY, SECRET, nonce)}


def task_count(client: TestClient) -> int:
    return client.app.state.services.store.reads.count()


def check_answer(client: TestClient, route: str, response: httpx.Response, tasks_before: int) -> None:
    """The properties every answer has, whatever was sent."""
    assert response.status_code < 500, response.text
    assert response.status_code in (200, 401, 404), (response.status_code, response.text)
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("result"), bool) and isinstance(body.get("errors"), list)
    if body["result"]:
        assert response.status_code == 200 and body["errors"] == []
    else:
        assert body["errors"], "a failure says why"
        for error in body["errors"]:
            assert isinstance(error["code"], int) and isinstance(error["message"], str) and error["message"]
        assert "Traceback" not in response.text and "Internal server error" not in response.text
    created = task_count(client) - tasks_before
    accepted_run = route == RUN_PATH and response.status_code == 200 and body["result"] is True
    assert created == (1 if accepted_run else 0), (route, body)
    if accepted_run:
        assert body["taskid"].isdigit() and len(body["socketaccesstoken"]) == 30


def still_up(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/Task/List", json={"limit": 1}, headers=signed()).json()["result"] is True


# --- schema-driven: conforming and violating bodies for every operation ----------------------------------------


@pytest.fixture(scope="module")
def schema(client: TestClient) -> Any:
    answer = client.get("/openapi.json")
    assert answer.status_code == 200
    return schemathesis.openapi.from_dict(answer.json())


def _send_case(client: TestClient, case: Any) -> httpx.Response:
    """Send a schemathesis case as schemathesis would (its requests serialization), in process."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    prepared = requests.Request(
        method=kwargs["method"], url=kwargs["url"], headers=kwargs.get("headers"), params=kwargs.get("params"),
        json=kwargs.get("json"), data=kwargs.get("data"), files=kwargs.get("files"),
    ).prepare()
    body = prepared.body or b""
    headers = {k: v for k, v in prepared.headers.items() if k.lower() not in ("content-length", "connection")}
    return client.request(prepared.method or "POST", prepared.url or "", content=body if isinstance(body, bytes)
                          else body.encode(), headers={**headers, **signed()})


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("route", ROUTES)
def test_schema_conforming_and_violating_bodies_are_answered_in_the_contracts_shapes(
    client: TestClient, schema: Any, route: str, mode: GenerationMode
) -> None:
    operation = schema[route]["POST"]

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        before = task_count(client)
        response = _send_case(client, case)
        check_answer(client, route, response, before)
        case.validate_response(response, checks=[
            not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
        ])

    fuzz()
    still_up(client)


# --- anything at all ---------------------------------------------------------------------------------------------

_odd_numbers = st.sampled_from([
    "NaN", "nan", "-NaN", "Infinity", "-Infinity", "inf", "-inf", "1e309", "-1e309", "1e-400", "0x10", "1_000",
    "81.0", " 81 ", "81.5", "+81", "-0", "0.0", "", " ", "٨١", "８１", "9" * 400, "1e18", "-1",
])
_urls = st.sampled_from([
    "http://93.184.216.34/dog.png", "http://127.0.0.1/x.png", "http://public.example/x.png", "http://[::1]/",
    "http://169.254.169.254/latest/meta-data/", "ftp://93.184.216.34/x", "http://testserver/files/uploads/x/y.png",
    "https://" + "a" * 3000 + ".example/", "javascript:alert(1)", "http://93.184.216.34:99999/",
])
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80), st.integers(),
    st.floats(allow_nan=False, allow_infinity=False), _odd_numbers, _urls, st.text(max_size=60),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
)
_json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
TOKEN = "<a real task's token>"
TASKID = "<a real task's id>"
"""Placeholders replaced, when sent, by the newest task's token and id, so that task routes reach real tasks."""


def _near(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value that is right about half the time, anything at all otherwise."""
    return st.one_of(valid, _json_values)


_small_ints = st.integers(min_value=0, max_value=60)
_ids = st.one_of(st.sampled_from([TOKEN, TASKID]), _small_ints.map(str), _small_ints, st.text(max_size=40),
                 _json_values)
_known_fields = {
    "inputImageUrl": _near(_urls), "callbackUrl": _near(_urls), "inputImage": _near(_urls),
    "prompt": _near(st.text(max_size=200)), "negativePrompt": _near(st.text(max_size=50)),
    "fps": _near(st.integers(min_value=1, max_value=60)), "width": _near(st.sampled_from([0, 16, 32, "32", "0"])),
    "height": _near(st.sampled_from([0, 16, 32, "32", "0"])), "numFrames": _near(st.sampled_from([1, 5, 9, "9"])),
    "steps": _near(st.sampled_from([1, 2, "2"])), "scale": _near(st.floats(min_value=0, max_value=30)),
    "flowShift": _near(st.floats(min_value=0.1, max_value=50)), "seed": _near(st.integers(-1, 2**32 - 1)),
    "taskid": _ids, "tasktoken": _ids, "socketaccesstoken": _ids, "start": _near(_small_ints),
    "limit": _near(st.integers(1, 100)), "slugowner": _near(st.sampled_from(["codexq", "CODEXQ", "x"])),
    "slugproject": _near(st.sampled_from(["Particalize", "particalize", "y"])),
}
BASES: dict[str, dict[str, Any]] = {
    RUN_PATH: {"inputImageUrl": "http://images.example/dog.png", "numFrames": "9", "steps": "2", "width": "32",
               "height": "32"},
    "/v1/Task/Detail": {"tasktoken": TOKEN},
    "/v1/Task/Kill": {"socketaccesstoken": TOKEN},
    "/v1/Task/Cancel": {"taskid": TASKID},
    "/v1/Task/List": {"start": "0", "limit": "5"},
    "/v1/Tool/Detail": {"slugowner": "codexq", "slugproject": "Particalize"},
    "/v1/Task/InputOutputDelete": {"tasktoken": TOKEN},
}
"""A valid body per route, which the fuzzer then mutates: fields dropped, replaced by anything, added."""


@st.composite
def _fields(draw: st.DrawFn, route: str) -> dict[str, Any]:
    fields = dict(BASES.get(route, {}))
    for name in draw(st.sets(st.sampled_from(sorted(fields)))) if fields else ():
        del fields[name]
    fields.update(draw(st.fixed_dictionaries({}, optional=_known_fields)))
    fields.update(draw(st.dictionaries(st.text(max_size=12), _json_values, max_size=3)))
    return fields


_content_types = st.one_of(
    st.none(),
    st.sampled_from([
        "application/json", "application/json; charset=latin-1", "multipart/form-data",
        "multipart/form-data; boundary=xyz", "multipart/form-data; boundary=", "application/x-www-form-urlencoded",
        "text/plain", "application/octet-stream", "image/png", "multipart/mixed; boundary=b", ";;;", "*/*",
    ]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
_header_text = st.binary(max_size=40).map(lambda b: bytes(c for c in b if 32 <= c <= 126 or c >= 128))


STALE_NONCE = "1"
"""A correctly signed nonce far outside the freshness window (unix time 1 is 1970)."""


@st.composite
def _bad_auth(draw: st.DrawFn) -> dict[str, Any]:
    """Auth headers that must be refused: none, unknown or garbled, a wrong signature, a stale nonce, or a
    signed key sent without its signature."""
    kind = draw(st.sampled_from(["none", "garbled", "wrong-signature", "stale", "unsigned"]))
    if kind == "none":
        return {}
    if kind == "wrong-signature":
        return {**signed(), "x-signature": draw(_header_text)}
    if kind == "stale":
        return {"x-api-key": KEY, "x-nonce": STALE_NONCE, "x-signature": sign(KEY, SECRET, STALE_NONCE)}
    if kind == "unsigned":
        return {"x-api-key": KEY}
    garbled = {name: draw(_header_text) for name in ("x-nonce", "x-signature") if draw(st.booleans())}
    key = draw(st.one_of(st.just(KEY.encode()), _header_text.filter(lambda text: text.strip() != PLAIN_KEY.encode())))
    return {"x-api-key": key, **garbled} if draw(st.booleans()) else garbled


_good_auth = st.sampled_from(["signed", "signed", "signed", "plain"]).map(
    lambda kind: signed() if kind == "signed" else {"x-api-key": PLAIN_KEY}
)
"""Mostly the signed key, whose tasks TOKEN and TASKID name; sometimes the key-only one."""

_image_parts = st.one_of(
    st.just(("dog.png", png_bytes(), "image/png")),
    st.tuples(st.text(max_size=30), st.binary(max_size=300), st.sampled_from(["image/png", "text/plain", ""])),
    st.just(("big.png", b"\0" * (40 * 1024), "image/png")),
)


@st.composite
def _requests(
    draw: st.DrawFn, routes: st.SearchStrategy[str], auth: st.SearchStrategy[dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    """(path, keyword arguments of TestClient.post) with any body in any style."""
    route = draw(routes)
    if route == RUN_PATH and draw(st.integers(0, 9)) == 0:  # another tool: code 1, or a path that is no route
        route = f"/v1/Run/{quote(draw(st.text(max_size=12)), safe='')}/{quote(draw(st.text(max_size=12)), safe='')}"
    headers = draw(auth)
    style = draw(st.sampled_from(["json", "seed", "form", "multipart", "multipart-raw", "bytes", "json-text",
                                  "raw-json", "deep-json"]))
    fields = draw(_fields(route))
    if style == "json":
        return route, {"json": fields, "headers": headers}
    if style == "seed":
        content = json.dumps(fields).encode()
        return route, {"content": content, "headers": {**headers, "Content-Type": "multipart/form-data"}}
    if style == "json-text":  # NaN and infinities as JSON literals, any content type
        content = json.dumps(fields, allow_nan=True).replace("null", draw(st.sampled_from(["NaN", "null"])))
        return route, {"content": content.encode(), "headers": {**headers, **_content_type(draw(_content_types))}}
    if style == "raw-json":
        content = json.dumps(draw(_json_values)).encode()
        return route, {"content": content, "headers": {**headers, **_content_type(draw(_content_types))}}
    form = {str(k): str(v) for k, v in fields.items()}
    if style == "form":
        return route, {"data": form, "headers": headers}
    if style == "multipart":
        files = draw(st.dictionaries(st.sampled_from(["inputImage", "file", "inputImageUrl", "x"]), _image_parts,
                                     max_size=2))
        return route, {"data": form, "files": files or {"file": ("", b"", "")}, "headers": headers}
    if style == "deep-json":  # past the JSON parser's recursion limit, or just under it
        depth = draw(st.integers(min_value=1, max_value=3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = opener * depth + "1" + closer * depth
        content = draw(st.sampled_from([inner, '{"prompt": ' + inner + "}"])).encode()
        return route, {"content": content, "headers": {**headers, **_content_type(draw(_content_types))}}
    if style == "multipart-raw":
        boundary = draw(st.sampled_from(["B", "----x", "a b", "\u00e9"]))
        content = draw(_multipart_raw(boundary))
        return route, {"content": content, "headers": {**headers, "Content-Type": _multipart_type(boundary)}}
    content = draw(st.binary(max_size=2000))
    return route, {"content": content, "headers": {**headers, **_content_type(draw(_content_types))}}


def _multipart_type(boundary: str) -> bytes:
    quoted = boundary if boundary.isascii() and " " not in boundary else f'"{boundary}"'
    return f"multipart/form-data; boundary={quoted}".encode()


_dispositions = st.one_of(
    st.sampled_from([
        'form-data; name="inputImage"; filename="a.png"', 'form-data; name="file"; filename="a.png"',
        'form-data; name="prompt"', 'form-data; name="inputImageUrl"', "form-data", 'form-data; filename="x"',
        "form-data; name=", 'form-data; name="file"; filename*=UTF-8\'\'%E2%82%AC.png', "attachment", "",
    ]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=60),
)


@st.composite
def _multipart_raw(draw: st.DrawFn, boundary: str) -> bytes:
    """Hand-made multipart bodies: odd part headers, missing blank lines, truncation, no closing boundary."""
    delimiter = b"--" + boundary.encode()
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        headers = [f"Content-Disposition: {draw(_dispositions)}"]
        if draw(st.booleans()):
            headers.append(f"Content-Type: {draw(st.sampled_from(['image/png', 'text/plain', '', 'x']))}")
        head = "\r\n".join(headers).encode("latin-1")
        data = draw(st.one_of(st.just(png_bytes()), st.binary(max_size=200), st.text(max_size=50).map(str.encode)))
        separator = draw(st.sampled_from([b"\r\n\r\n", b"\r\n", b"\n\n", b""]))
        parts.append(delimiter + b"\r\n" + head + separator + data + b"\r\n")
    body = b"".join(parts) + draw(st.sampled_from([delimiter + b"--\r\n", delimiter + b"--", b"", delimiter]))
    cut = draw(st.integers(0, len(body)))
    return body if draw(st.booleans()) else body[:cut]


def _with_real_token(client: TestClient, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The request with TOKEN and TASKID replaced by the newest task's (if there is a task yet)."""
    _, newest = client.app.state.services.store.reads.list(KEY, 0, 1)
    token, taskid = (newest[0].socketaccesstoken, str(newest[0].id)) if newest else ("no-task-yet", "0")

    def swap(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.replace(TOKEN.encode(), token.encode()).replace(TASKID.encode(), taskid.encode())
        if isinstance(value, str):
            return value.replace(TOKEN, token).replace(TASKID, taskid)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    return {name: value if name in ("headers", "files") else swap(value) for name, value in kwargs.items()}


def _content_type(value: str | None) -> dict[str, str]:
    return {} if value is None else {"Content-Type": value}


def _post(client: TestClient, request: tuple[str, dict[str, Any]]) -> tuple[str, httpx.Response, int]:
    """Send it: (the route it is for, the answer, the task count before)."""
    route, kwargs = request
    kwargs = _with_real_token(client, kwargs)
    before = task_count(client)
    response = client.post(route, **kwargs)
    return (RUN_PATH if route.lower() == RUN_PATH.lower() else route), response, before  # slugs: any case


@pytest.mark.parametrize("route", ROUTES)
def test_arbitrary_bodies_and_content_types_never_break_the_contract(client: TestClient, route: str) -> None:
    @FUZZ
    @given(request=_requests(st.just(route), _good_auth))
    def fuzz(request: tuple[str, dict[str, Any]]) -> None:
        check_answer(client, *_post(client, request))

    fuzz()
    still_up(client)


def test_missing_or_garbled_auth_is_refused_with_401_whatever_the_body(client: TestClient) -> None:
    @settings(FUZZ, max_examples=EXAMPLES * 3)
    @given(request=_requests(st.sampled_from(ROUTES), _bad_auth()))
    def fuzz(request: tuple[str, dict[str, Any]]) -> None:
        route, response, before = _post(client, request)
        check_answer(client, "unauthenticated", response, before)
        if request[0] in ROUTES:
            assert response.status_code == 401, response.text

    fuzz()
    still_up(client)


@pytest.mark.parametrize("depth", [33, 900, 5000, 10_000])
@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data", None])
def test_deeply_nested_json_is_refused_in_the_error_shape_not_a_500(
    client: TestClient, depth: int, content_type: str | None
) -> None:
    """Found by this file: nesting past the JSON parser's recursion limit answered 500 (RecursionError)."""
    for body in ("[" * depth + "]" * depth, '{"prompt": ' + '{"a":' * depth + "1" + "}" * depth + "}"):
        before = task_count(client)
        response = client.post(RUN_PATH, content=body.encode(), headers={**signed(), **_content_type(content_type)})
        check_answer(client, RUN_PATH, response, before)
        assert "nested more than 32 levels" in response.json()["errors"][0]["message"]


def test_a_valid_run_still_works_after_the_fuzzing(client: TestClient) -> None:
    before = task_count(client)
    files = {"inputImage": ("dog.png", png_bytes(), "image/png")}
    run = client.post(RUN_PATH, data={"numFrames": "9", "steps": "2"}, files=files, headers=signed()).json()
    assert run["result"] is True and task_count(client) == before + 1
    detail = client.post("/v1/Task/Detail", json={"tasktoken": run["socketaccesstoken"]}, headers=signed()).json()
    assert detail["tasklist"][0]["status"] == "task_queue"


def test_openapi_describes_every_wiro_route_with_the_tool_inputs_of_tool_detail(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert set(document["paths"]) == set(ROUTES)
    run_body = document["paths"][RUN_PATH]["post"]["requestBody"]["content"]
    assert set(run_body) == {"application/json", "multipart/form-data", "application/x-www-form-urlencoded"}
    tool = client.post("/v1/Tool/Detail", json={}, headers=signed()).json()["tool"][0]
    items = {item["id"]: item for group in tool["parameters"] for item in group["items"]}
    properties = run_body["application/json"]["schema"]["properties"]
    assert set(items) <= set(properties) and "callbackUrl" in properties
    steps = properties["steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (items["steps"]["min"], items["steps"]["max"])
    frames = properties["numFrames"]["anyOf"][0]["enum"]
    assert frames[0] == 1 and frames[-1] == items["numFrames"]["max"] and all((n - 1) % 4 == 0 for n in frames)
    assert properties["width"]["anyOf"][0]["multipleOf"] == 16
    assert "format" in run_body["multipart/form-data"]["schema"]["properties"]["inputImage"]
