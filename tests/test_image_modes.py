"""Start images as phones and tools save them: EXIF orientation applied before sizing (a portrait phone photo runs as a
portrait video), and every mode Pillow opens turned into 8-bit RGB by its real range (a 16-bit PNG keeps its greys)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from particalize.compose_server import build_app
from pipeline.errors import InvalidParameter
from pipeline.images import decode_image, image_size, to_rgb
from pipeline.video import read_mp4
from tests.conftest import make_settings
from tests.test_api import KEY, RUN, SECRET, Api, run_worker_once

STORED = (96, 48)
"""A phone's sensor stores landscape pixels; orientation 6 says: show them turned 90 degrees clockwise."""


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def phone_jpeg(orientation: int = 6) -> bytes:
    """96x48 stored, left half red, right half blue, with the EXIF orientation a phone writes."""
    image = Image.new("RGB", STORED, (220, 20, 20))
    image.paste((20, 20, 220), (STORED[0] // 2, 0, STORED[0], STORED[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, "JPEG", exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize(("orientation", "shown"), [(1, (96, 48)), (3, (96, 48)), (5, (48, 96)), (6, (48, 96)),
                                                     (8, (48, 96))])
def test_the_size_read_from_the_header_and_the_decoded_image_follow_the_exif_orientation(orientation, shown):
    data = phone_jpeg(orientation)
    assert image_size(data) == shown
    assert decode_image(data).size == shown


def test_orientation_6_turns_the_picture_clockwise():
    pixels = np.asarray(decode_image(phone_jpeg(6)), dtype=int)
    top, bottom = pixels[5, 24], pixels[-5, 24]
    assert top[0] > 150 and top[2] < 100, "the stored left half (red) is shown on top"
    assert bottom[2] > 150 and bottom[0] < 100, "the stored right half (blue) is shown at the bottom"


def test_a_16_bit_greyscale_png_keeps_its_grey_levels():
    samples = np.array([[1000, 20000], [40000, 65535]], dtype=np.uint16)
    data = encoded(Image.fromarray(samples), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    grey = np.asarray(decode_image(data))
    assert grey[..., 0].tolist() == [[4, 78], [156, 255]]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_a_32_bit_integer_image_spans_its_own_range_and_one_within_16_bits_is_read_as_16_bit():
    wide = np.array([[0, 1_000_000], [2_000_000, 4_000_000]], dtype=np.int32)
    assert np.asarray(decode_image(encoded(Image.fromarray(wide), "TIFF")))[..., 0].tolist() == [[0, 64], [128, 255]]
    sixteen = np.array([[0, 257], [32896, 65535]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(sixteen)))[..., 0].tolist() == [[0, 1], [128, 255]]


def test_a_float_image_within_0_and_1_spans_that_range_and_another_spans_its_own():
    unit = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    assert np.asarray(decode_image(encoded(Image.fromarray(unit), "TIFF")))[..., 0].tolist() == [[0, 64], [128, 255]]
    hdr = np.array([[-2.0, 0.0], [2.0, 6.0]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(hdr)))[..., 0].tolist() == [[0, 64], [128, 255]]
    flat = np.full((2, 2), 7.0, dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(flat))).max() == 0, "no range: black, not a division by zero"


def test_transparent_pixels_show_the_white_background_not_the_colour_under_them():
    la = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent
    la.putpixel((0, 0), (0, 255))  # one opaque black pixel
    pixels = np.asarray(decode_image(encoded(la, "PNG")))
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[1, 1].tolist() == [255, 255, 255]
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.putpixel((0, 0), 1)
    pixels = np.asarray(decode_image(encoded(palette, "PNG", transparency=0)))
    assert pixels[0, 0].tolist() == [200, 0, 0] and pixels[3, 3].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I", "I;16", "I;16B", "F"])
def test_every_mode_pillow_opens_becomes_8_bit_rgb(mode):
    image = Image.new(mode, (4, 4))
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (4, 4)


def test_a_mode_pillow_cannot_convert_is_refused_saying_what_to_send():
    with pytest.raises(InvalidParameter) as refused:
        to_rgb(Image.new("La", (4, 4)))
    assert "mode La" in str(refused.value) and "PNG or JPEG" in str(refused.value)


def test_generate_makes_a_portrait_video_of_a_portrait_phone_photo(tmp_path: Path):
    from particalize.cli import main

    (tmp_path / "phone.jpg").write_bytes(phone_jpeg(6))
    out = tmp_path / "out.mp4"
    assert main(["generate", "--model", "tiny", "--image", str(tmp_path / "phone.jpg"), "--out", str(out),
                 "--num-frames", "5", "--steps", "1", "--seed", "3"]) == 0
    _meta, frames = read_mp4(out)
    assert frames.shape[1] > frames.shape[2], f"portrait expected, got {frames.shape[2]}x{frames.shape[1]}"


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", api_keys=f"{KEY}:{SECRET}")


@pytest.fixture
def api(settings) -> Iterator[Api]:
    with TestClient(build_app(settings)) as client:
        yield Api(client)


def test_a_run_with_a_portrait_phone_photo_sizes_and_makes_a_portrait_video(api: Api, settings, tiny_generator):
    body = {"numFrames": "5", "steps": "1", "width": "0", "height": "0", "seed": "7"}
    run = api.multipart(RUN, body, {"inputImage": ("phone.jpg", phone_jpeg(6), "image/jpeg")}).json()
    assert run["result"] is True, run
    assert run_worker_once(api.client, settings, tiny_generator)
    task = api.detail(taskid=run["taskid"])["tasklist"][0]
    assert task["pexit"] == "0", task["debugerror"]
    width, height = int(task["parameters"]["width"]), int(task["parameters"]["height"])
    assert height > width, (width, height)
    _meta, frames = read_mp4(Path(settings.outputs_dir) / task["uuid"] / "0.mp4")
    assert frames.shape[1:3] == (height, width)
