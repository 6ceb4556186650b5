"""A JPEG of a video's first, middle and last frame side by side: a batch's results at a glance."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.video import to_uint8


def sheet_indices(num_frames: int) -> list[int]:
    """First, middle and last frame (repeated when the video is shorter than three frames)."""
    if num_frames < 1:
        raise ValueError("a contact sheet needs at least one frame")
    return [0, (num_frames - 1) // 2, num_frames - 1]


def contact_sheet(frames: np.ndarray) -> Image.Image:
    """Frames (F, H, W, 3), float in [0, 1] or uint8, to one (H, 3W) RGB image."""
    frames = to_uint8(np.asarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {frames.shape}")
    picked = [frames[i] for i in sheet_indices(len(frames))]
    return Image.fromarray(np.concatenate(picked, axis=1))


def write_contact_sheet(frames: np.ndarray, path: Path, quality: int = 90) -> Path:
    """Write the sheet as JPEG; a temp name and a rename, so a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".jpg", dir=path.parent)
    os.close(fd)
    try:
        contact_sheet(frames).save(tmp, format="JPEG", quality=quality)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
