"""Bad input gets an answer that says what is wrong, in one voice ("Request parameter [field] must be <what is
allowed>, got <the value as sent>"): images over the pixel limit whatever their size (Pillow's own bomb guard
fires first for the largest), hosts that do not resolve, out-of-range values echoed as sent."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from particalize.compose_server import build_app
from pipeline.errors import InvalidParameter
from pipeline.images import MAX_IMAGE_PIXELS, decode_image
from tests.conftest import make_settings

RUN = "/v1/Run/codexq/Particalize"
SMALL = {"numFrames": "9", "steps": "2", "width": "32", "height": "32"}


def blank_png(width: int, height: int) -> bytes:
    """A valid, highly compressible PNG of this size (1-bit, so making it costs width x height / 8 bytes)."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}")
    with TestClient(build_app(settings)) as client:
        yield client


def error_of(answer) -> str:
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["result"] is False and body["errors"][0]["code"] == 0, body
    return body["errors"][0]["message"]


@pytest.mark.parametrize(("width", "height"), [(8000, 6000), (10000, 10000), (20000, 20000)])
def test_an_image_over_the_pixel_limit_says_so_with_its_size_whatever_its_size(client, width, height):
    # 48 Mpx passes Pillow's guard; 100 Mpx trips its warning, 400 Mpx its error: all get the same answer
    answer = client.post(RUN, data=SMALL, files={"inputImage": ("big.png", blank_png(width, height), "image/png")})
    assert error_of(answer) == (
        f"Request parameter [inputImage] must be an image of at most {MAX_IMAGE_PIXELS} pixels, got "
        f"{width}x{height} ({width * height} pixels)."
    )


@pytest.mark.parametrize(("data", "message"), [
    (b"", "must be a PNG, JPEG or WebP image, got an empty file."),
    (b"certainly not an image", "must be a PNG, JPEG or WebP image, got a file that is not an image."),
    (blank_png(1, 1), "must be at least 2x2 pixels, got 1x1."),
])
def test_images_that_cannot_be_used_say_why(data: bytes, message: str):
    with pytest.raises(InvalidParameter) as info:
        decode_image(data, field="inputImage")
    assert str(info.value) == f"Request parameter [inputImage] {message}"


def test_an_unresolvable_host_is_answered_as_such(client, monkeypatch):
    def no_such_host(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    answer = client.post(RUN, json={**SMALL, "inputImageUrl": "https://images.exmaple.com/dog.png"})
    message = error_of(answer)
    assert message == (
        "Request parameter [inputImageUrl] must be a URL whose host resolves, got "
        "'https://images.exmaple.com/dog.png': the host 'images.exmaple.com' could not be resolved from this "
        "server; check its spelling (a name only your own network knows cannot be reached from here)."
    )
    assert "PARTICALIZE_ALLOW_PRIVATE_URLS" not in message


def test_a_private_address_names_the_operator_setting(client):
    answer = client.post(RUN, json={**SMALL, "inputImageUrl": "http://10.1.2.3/dog.png"})
    assert error_of(answer) == (
        "Request parameter [inputImageUrl] must be a public http(s) URL, got 'http://10.1.2.3/dog.png': URL host "
        "10.1.2.3 resolves to 10.1.2.3, which is not a public address; only public http(s) URLs are allowed. (an "
        "operator can allow private addresses with PARTICALIZE_ALLOW_PRIVATE_URLS=1)."
    )


@pytest.mark.parametrize(("sent", "message"), [
    ({"fps": "0"}, "[fps] must be between 1 and 60, got '0'."),
    ({"scale": "-1"}, "[scale] must be between 0 and 30, got '-1'."),
    ({"scale": -1.0}, "[scale] must be between 0 and 30, got -1.0."),
    ({"steps": "2.5"}, "[steps] must be a whole number, got '2.5'."),
    ({"numFrames": "10"}, "[numFrames] must be 4*n + 1 (for example 33, 49, 81), got '10'."),
    ({"seed": "-5"}, "[seed] must be -1 (random) or between 0 and 4294967295, got '-5'."),
])
def test_out_of_range_values_are_echoed_as_sent(client, sent: dict, message: str):
    answer = client.post(RUN, json={**SMALL, "inputImageUrl": "http://127.0.0.1:9/x.png", **sent})
    assert error_of(answer) == f"Request parameter {message}"
