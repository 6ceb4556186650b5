"""Specification of request body parsing: every form Wiro clients send becomes one field map."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from server.bodies import parse_fields, read_body
from server.errors import ApiError, error_body

MAX_BYTES = 4096
SEED_BODY = (
    b'{"inputImageUrl": "https://example.com/input-cartoon-dog-2.jpg", '
    b'"prompt": "A cartoon dog crystallizes", "negativePrompt": "bad quality video", '
    b'"fps": "16", "width": "0", "height": "0", "numFrames": "81", "steps": "30", '
    b'"scale": "5.0", "flowShift": "5.0"}'
)


def make_app() -> FastAPI:
    app = FastAPI()

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body([(exc.code, exc.message)]), status_code=exc.http_status)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        fields = await parse_fields(request, await read_body(request, MAX_BYTES), MAX_BYTES)  # as the routes read
        files = {
            name: {
                "filename": f.filename,
                "content_type": f.content_type,
                "data": base64.b64encode(f.data).decode(),
            }
            for name, f in fields.files.items()
        }
        return {"values": fields.values, "files": files}

    return app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(make_app()) as test_client:
        yield test_client


def values(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()["values"]


def error_message(response) -> str:
    """The single error of a contract-shaped failure answer (HTTP 200, result false, code 0)."""
    assert response.status_code == 200
    body = response.json()
    assert body["result"] is False
    assert len(body["errors"]) == 1
    assert body["errors"][0]["code"] == 0
    return body["errors"][0]["message"]


def test_seed_curl_json_sent_as_multipart_without_boundary(client: TestClient) -> None:
    response = client.post("/echo", content=SEED_BODY, headers={"Content-Type": "multipart/form-data"})
    assert values(response) == json.loads(SEED_BODY)
    assert values(response)["scale"] == "5.0"


def test_curl_d_json_labelled_urlencoded_is_read_as_json(client: TestClient) -> None:
    response = client.post("/echo", content=SEED_BODY, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert values(response) == json.loads(SEED_BODY)


def test_json_keeps_scalar_types_and_nested_values(client: TestClient) -> None:
    sent = {"prompt": "p", "fps": 16, "scale": 5.5, "flag": True, "none": None, "nested": {"a": [1]}}
    response = client.post("/echo", json=sent)
    assert values(response) == sent


def test_json_with_charset_and_bom(client: TestClient) -> None:
    response = client.post(
        "/echo",
        content=b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert values(response) == {"prompt": "café"}


def test_duplicate_json_key_last_wins(client: TestClient) -> None:
    response = client.post(
        "/echo", content=b'{"steps": "10", "steps": "20"}', headers={"Content-Type": "application/json"}
    )
    assert values(response) == {"steps": "20"}


def test_real_multipart_with_fields_and_image_file(client: TestClient) -> None:
    image = b"\x89PNG\r\n\x1a\nfake-image-bytes"
    response = client.post(
        "/echo",
        data={"prompt": "a dog", "numFrames": "81", "inputImageUrl": ""},
        files={"inputImage": ("dog.png", image, "image/png")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["values"] == {"prompt": "a dog", "numFrames": "81", "inputImageUrl": ""}
    assert body["files"] == {
        "inputImage": {
            "filename": "dog.png",
            "content_type": "image/png",
            "data": base64.b64encode(image).decode(),
        }
    }


def test_multipart_input_image_as_url_value(client: TestClient) -> None:
    response = client.post(
        "/echo",
        data={"inputImage": "https://example.com/dog.jpg"},
        files={"unused": ("", b"", "application/octet-stream")},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "values": {"inputImage": "https://example.com/dog.jpg", "unused": ""},
        "files": {},
    }


def test_multipart_duplicate_field_last_wins(client: TestClient) -> None:
    boundary = "XyZ"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="steps"\r\n\r\n10\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="steps"\r\n\r\n20\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    response = client.post("/echo", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert values(response) == {"steps": "20"}


def test_urlencoded_form(client: TestClient) -> None:
    response = client.post("/echo", data={"prompt": "a dog & a cat", "scale": "5.0", "empty": ""})
    assert values(response) == {"prompt": "a dog & a cat", "scale": "5.0", "empty": ""}


def test_urlencoded_duplicate_field_last_wins(client: TestClient) -> None:
    response = client.post(
        "/echo", content=b"steps=10&steps=20", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert values(response) == {"steps": "20"}


@pytest.mark.parametrize("content_type", [None, "application/json", "multipart/form-data", "text/plain"])
def test_empty_body_gives_no_fields(client: TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/echo", content=b"", headers=headers)
    assert response.json() == {"values": {}, "files": {}}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream", "foo"])
def test_missing_or_odd_content_type_with_json_object_body(client: TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/echo", content=b'{"taskid": "7"}', headers=headers)
    assert values(response) == {"taskid": "7"}


def test_body_over_limit_with_content_length(client: TestClient) -> None:
    response = client.post("/echo", json={"prompt": "x" * MAX_BYTES})
    assert error_message(response) == f"Request body is larger than {MAX_BYTES} bytes."


def test_body_over_limit_without_content_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = client.post("/echo", content=chunks(), headers={"Content-Type": "application/json"})
    assert error_message(response) == f"Request body is larger than {MAX_BYTES} bytes."


def test_body_at_limit_is_accepted(client: TestClient) -> None:
    prefix, suffix = b'{"p": "', b'"}'
    body = prefix + b"x" * (MAX_BYTES - len(prefix) - len(suffix)) + suffix
    assert len(body) == MAX_BYTES
    response = client.post("/echo", content=body, headers={"Content-Type": "application/json"})
    assert len(values(response)["p"]) == MAX_BYTES - 9


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data", None])
def test_malformed_json_is_a_validation_error(client: TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/echo", content=b'{"prompt": "unterminated', headers=headers)
    message = error_message(response)
    assert "not valid JSON" in message
    assert "application/json" in message


@pytest.mark.parametrize("body", [b'["prompt"]', b'"prompt"', b"42", b"null"])
def test_json_that_is_not_an_object_is_refused(client: TestClient, body: bytes) -> None:
    response = client.post("/echo", content=body, headers={"Content-Type": "application/json"})
    assert "must be a JSON object" in error_message(response)


def test_json_array_sent_as_seed_style_multipart_is_refused(client: TestClient) -> None:
    response = client.post("/echo", content=b'[{"prompt": "p"}]', headers={"Content-Type": "multipart/form-data"})
    assert "must be a JSON object" in error_message(response)


def test_nan_is_not_accepted_as_a_json_number(client: TestClient) -> None:
    response = client.post("/echo", content=b'{"scale": NaN}', headers={"Content-Type": "application/json"})
    assert "not valid JSON" in error_message(response)


def test_invalid_utf8_is_refused(client: TestClient) -> None:
    response = client.post("/echo", content=b'{"prompt": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert "UTF-8" in error_message(response)


def test_invalid_utf8_in_urlencoded_form_is_refused(client: TestClient) -> None:
    response = client.post(
        "/echo", content=b"prompt=%ff%fe", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert "UTF-8" in error_message(response)


def test_multipart_body_not_matching_its_boundary_is_refused(client: TestClient) -> None:
    body = b'--other\r\nContent-Disposition: form-data; name="prompt"\r\n\r\np\r\n--other--\r\n'
    response = client.post("/echo", content=body, headers={"Content-Type": "multipart/form-data; boundary=expected"})
    message = error_message(response)
    assert "boundary" in message
    assert "application/json" in message


def test_multipart_without_boundary_and_not_json_is_refused(client: TestClient) -> None:
    response = client.post("/echo", content=b"prompt=p", headers={"Content-Type": "multipart/form-data"})
    assert "boundary" in error_message(response)


def test_broken_multipart_part_is_refused(client: TestClient) -> None:
    body = b"--b\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--b--\r\n"
    response = client.post("/echo", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert "multipart/form-data body could not be read" in error_message(response)


def test_truncated_multipart_is_refused_not_half_read(client: TestClient) -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nvalue\r\n'
        b'--b\r\nContent-Disposition: form-data; name="inputImage"; filename="x.png"\r\n\r\ncut-off'
    )
    response = client.post("/echo", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert "incomplete" in error_message(response)
