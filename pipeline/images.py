"""Decode and check a start image: format, size and pixel count, before any model work."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from pipeline.errors import InvalidParameter

MAX_IMAGE_PIXELS = 40_000_000
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The size an image's header declares, read by the format's own plugin without Pillow's decompression-bomb
    guard (that guard fires inside Image.open, before a caller can see the size)."""
    Image.init()
    for fmt in ALLOWED_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and not accept(data[:16])):
            continue
        try:
            with factory(io.BytesIO(data), None) as probe:
                return probe.size
        except Exception:  # not this format, or a malformed header: try the next one
            continue
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the image's header declares it (what `decode_image` will give), without decoding the
    pixels; None when the header cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size
    except Image.DecompressionBombError:
        return _header_size(data)
    except Exception:  # not an image, or a malformed header
        return None


def decode_image(data: bytes, field: str = "inputImage", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes to an RGB image; a decompression bomb, a truncated file or a non-image is a clear error."""
    return decode_image_with_format(data, field, max_pixels)[0]


def decode_image_with_format(data: bytes, field: str = "inputImage",
                             max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, str]:
    """`decode_image`, and the file's format as Pillow names it (PNG, JPEG, ...), read in the same pass."""
    if not data:
        raise InvalidParameter(field, "must be a PNG, JPEG or WebP image, got an empty file.")

    def too_large(width: int, height: int) -> InvalidParameter:
        return InvalidParameter(
            field, f"must be an image of at most {max_pixels} pixels, got {width}x{height} ({width * height} pixels)."
        )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            fmt = probe.format
            width, height = probe.size
            if fmt not in ALLOWED_FORMATS:
                raise InvalidParameter(field, f"must be a PNG, JPEG or WebP image, got {fmt}.")
            if width * height > max_pixels:
                raise too_large(width, height)
            probe.load()
            image = probe.convert("RGB")
    except InvalidParameter:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size = _header_size(data)
        if size is not None:
            raise too_large(*size) from None
        raise InvalidParameter(field, f"must be an image of at most {max_pixels} pixels.") from None
    except UnidentifiedImageError:
        raise InvalidParameter(field, "must be a PNG, JPEG or WebP image, got a file that is not an image.") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidParameter(field, f"must be a complete image file, got one that could not be decoded ({exc}).") \
            from None
    if image.width < 2 or image.height < 2:
        raise InvalidParameter(field, f"must be at least 2x2 pixels, got {image.width}x{image.height}.")
    return image, fmt
