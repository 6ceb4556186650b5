"""Start images for tests: deterministic noise with a given size."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(width: int = 40, height: int = 40, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    noise_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()
