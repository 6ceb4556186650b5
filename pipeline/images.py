"""Decode and check a start image: format, size and pixel count, before any model work; then the picture as it is
shown (EXIF orientation applied, as phones save photos) in 8-bit RGB, by the real range of its samples."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

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


SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
"""EXIF orientations that turn the stored picture by 90 degrees: the shown width is the stored height."""


def _shown_size(probe: Image.Image) -> tuple[int, int]:
    """The size as the picture is shown: the stored size, turned when its EXIF orientation says so."""
    try:
        orientation = probe.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # an unreadable EXIF block: shown as stored, as exif_transpose does
        orientation = None
    width, height = probe.size
    return (height, width) if orientation in SWAPPING_ORIENTATIONS else (width, height)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the picture is shown (what `decode_image` will give: EXIF orientation applied), read from
    the header without decoding the pixels; None when the header cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                return _shown_size(probe)
    except Image.DecompressionBombError:
        return _header_size(data)
    except Exception:  # not an image, or a malformed header
        return None


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image to 8-bit grey by its real range: 16-bit samples
    (I;16*, and 'I' whose values fit 16 bits, as Pillow hands some 16-bit files over) span 0-65535; float samples
    within 0-1 span 0-1; any other 32-bit or float image spans its own minimum to maximum."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


TRANSPARENT_BACKGROUND = (255, 255, 255)
"""What shows through transparent pixels: white, as an image viewer shows a cut-out subject."""


def to_rgb(image: Image.Image, field: str = "inputImage") -> Image.Image:
    """Any mode Pillow opens as 8-bit RGB: high bit depths by their real range (not clipped to white), transparency
    over TRANSPARENT_BACKGROUND (not the undefined colour under it), palette, CMYK and the rest through Pillow's own
    conversions; a mode with none is refused saying so."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _gray_to_8bit(image).convert("RGB")
    try:
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InvalidParameter(field, f"must be an image Pillow can turn into RGB; its mode {image.mode} cannot be "
                                      f"({exc}): save it as an 8- or 16-bit RGB or greyscale PNG or JPEG.") from None


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
            image = to_rgb(ImageOps.exif_transpose(probe), field)
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
