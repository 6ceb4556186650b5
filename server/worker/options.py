"""What a worker is told: who it is, where its store is, what it may accept and fetch, how it paces itself."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.params import Limits
from server.limits import RequestLoraOptions
from server.store import StoreOptions


@dataclass(frozen=True)
class FetchOptions:
    """How the worker fetches a start image given by URL."""

    max_image_bytes: int = 20 * 1024 * 1024
    timeout_seconds: float = 20.0
    allow_private_urls: bool = False


@dataclass(frozen=True)
class WorkerOptions:
    node_name: str
    """This machine's name in worker ids (<node>/gpu<N>)."""
    model: str = ""
    """The model it registers as loading and serving."""
    version: str = ""
    """The particalize version it registers (a rolling upgrade shows both)."""
    store: StoreOptions = StoreOptions()
    limits: Limits = Limits()
    fetch: FetchOptions = FetchOptions()
    request_loras: RequestLoraOptions = RequestLoraOptions()
    """LoRAs sent with a request: downloaded, cached and checked by the worker (server/worker/request_loras.py)."""
    poll_seconds: float = 0.05
    """How often an idle worker looks for a queued task when nothing wakes it (server/wakeup.py)."""
    safety_poll_seconds: float = 5.0
    """With wake-ups (PostgreSQL's notifications, or serve's pipe on SQLite): how often an idle worker still looks
    for a task, and a running one reads its kill flag, by itself (covering a lost wake-up)."""
    progress_interval_seconds: float = 0.25
    """Least time between two progress writes of a running task (the last step is always written)."""
    shutdown_finish_seconds: float = 120.0
    """Past the grace period, the time a finished video still gets to be decoded, stored and recorded."""
    min_free_disk_bytes: int = 1024**3
    """Below this free space where it writes, the worker claims nothing (and fails a write it cannot make)."""
    cost_per_second: float = 0.0


def worker_id_for(node_name: str, slot: int) -> str:
    return f"{node_name}/gpu{slot}"
