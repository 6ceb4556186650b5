"""What one request may send, ask for and make this server fetch (checked by Run, File/Upload and the worker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.params import Limits
from pipeline.resolve import Modes


@dataclass(frozen=True)
class RequestLoraOptions:
    """LoRAs sent with a request (PARTICALIZE_REQUEST_LORAS, off by default): which hosts they may come from, how
    many and how large, and the worker's disk cache of them (server/request_loras.py, server/lora_cache.py)."""

    enabled: bool = False
    hosts: tuple[str, ...] = ()
    """Host names a LoRA URL (and every redirect) may be on: `huggingface.co` exactly, `*.hf.co` any subdomain."""
    max_count: int = 2
    max_bytes: int = 1024**3
    """Largest file downloaded: a bigger one fails the task."""
    cache_dir: Path = Path("data/request-loras")
    cache_bytes: int = 10 * 1024**3
    """The cache's size, held by evicting the least recently used files no running task holds."""
    timeout_seconds: float = 600.0
    """Longest one download may take."""
    allow_private_urls: bool = False

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for entry in self.hosts:
            entry = entry.lower().strip().rstrip(".")
            if entry.startswith(("*.", ".")):
                if host.endswith("." + entry.lstrip("*.")):
                    return True
            elif host == entry:
                return True
        return False


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
    request_loras: RequestLoraOptions = field(default_factory=RequestLoraOptions)
