"""What one request may send, ask for and make this server fetch (checked by Run, File/Upload and the worker)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.params import Limits
from pipeline.resolve import Modes


@dataclass(frozen=True)
class RequestLimits:
    """What one request may send, ask for and make this server fetch."""

    params: Limits = field(default_factory=Limits)
    """The tool inputs' limits (frames, steps, size, work, fast and cached mode)."""
    modes: Modes = field(default_factory=Modes)
    """The workers' modes (default, fast mode's schedule, cached mode): a Run whose image came with it is resolved
    with them."""
    max_body_bytes: int = 25 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    fetch_timeout_seconds: float = 20.0
    allow_private_urls: bool = False
    """Allow image and callback URLs to private addresses."""
