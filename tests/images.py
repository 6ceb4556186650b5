"""Start images for tests and benchmarks: deterministic noise with a given size, and a loopback HTTP server
that serves one as inputImageUrl points at it."""

from __future__ import annotations

import io
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
from PIL import Image

from tests.loopback import LoopbackServer


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(width: int = 40, height: int = 40, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    noise_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


class ImageServer(LoopbackServer):
    """Where inputImageUrl points: a plain HTTP server on 127.0.0.1 answering every GET with one PNG."""

    def __init__(self, width: int = 48, height: int = 40, name: str = "input-cartoon-dog-2.png") -> None:
        image = png_bytes(width, height)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.port}/{name}"
