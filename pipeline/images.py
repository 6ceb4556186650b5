"""Decode and check a start image: format, size and pixel count, before any model work."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from pipeline.errors import InvalidParameter

MAX_IMAGE_PIXELS = 40_000_000
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}


def decode_image(data: bytes, field: str = "inputImage", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes to an RGB image; a decompression bomb, a truncated file or a non-image is a clear error."""
    if not data:
        raise InvalidParameter(field, "is empty: send a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            fmt = probe.format
            width, height = probe.size
            if fmt not in ALLOWED_FORMATS:
                raise InvalidParameter(field, f"has unsupported format {fmt}: send PNG, JPEG or WebP")
            if width * height > max_pixels:
                raise InvalidParameter(field, f"is {width}x{height}, more than {max_pixels} pixels")
            probe.load()
            image = probe.convert("RGB")
    except InvalidParameter:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidParameter(field, "is not a decodable image: send a PNG, JPEG or WebP file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidParameter(field, f"could not be decoded ({exc}): send a complete image file") from None
    if image.width < 2 or image.height < 2:
        raise InvalidParameter(field, f"is {image.width}x{image.height}; it must be at least 2x2 pixels")
    return image
