"""A task's request LoRAs, made ready before it starts: each downloaded through the URL guard (its host, and every
redirect's, on the allow-list; a public address; at most the size cap) or taken from the disk cache, held there
for the task's run (server/lora_cache.py), and checked against the warm model's base (keys and shapes). Anything
wrong fails the task as bad input, naming the LoRA and what to send instead; the worker serves the next task."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import LoraMismatch
from server.limits import RequestLoraOptions
from server.lora_cache import CacheMismatch, LoraCache
from server.netguard import FetchError, TooLarge, UnsafeUrl, download_url
from server.task_record import RequestLora
from server.worker.outcomes import Outcome, TaskEnd


@dataclass(frozen=True)
class ReadyLoras:
    files: tuple[tuple[Path, float], ...]
    """(file, strength) in the request's order, held in the cache until the task's ExitStack closes."""
    downloaded: int
    """How many were downloaded (the others came from the cache)."""

    def describe(self) -> str:
        count = len(self.files)
        return (f"; {count} request LoRA{'s' if count != 1 else ''} ({self.downloaded} downloaded, "
                f"{count - self.downloaded} from the cache)") if count else ""


def ready_loras(loras: Sequence[RequestLora], options: RequestLoraOptions, check: Callable[[list[Path]], None],
                held: ExitStack) -> ReadyLoras:
    """The request's LoRA files, downloaded or cached, held until `held` closes and checked with `check` (the
    generator's: LoraMismatch for a file that is not a LoRA for its base); TaskEnd(BAD_INPUT) saying what is
    wrong."""
    if not loras:
        return ReadyLoras((), 0)
    if not options.enabled:
        raise TaskEnd(Outcome.BAD_INPUT, "Request parameter [loras]: request LoRAs are disabled on this worker "
                                         "(PARTICALIZE_REQUEST_LORAS=1 turns them on); send the task without them.")
    cache = LoraCache(options.cache_dir, options.cache_bytes)
    files, downloaded = [], 0
    for index, lora in enumerate(loras):
        where = f"Request parameter [loras] item {index + 1} ({lora.url})"

        def download(out: BinaryIO, url: str = lora.url) -> int:
            return download_url(url, out, max_bytes=options.max_bytes, timeout=options.timeout_seconds,
                                allow_private=options.allow_private_urls, allow_host=options.allows_host)

        try:
            file = cache.get(lora.url, lora.sha256, download)
        except UnsafeUrl as exc:
            raise TaskEnd(Outcome.BAD_INPUT, f"{where} is refused: {exc}") from None
        except TooLarge:
            raise TaskEnd(Outcome.BAD_INPUT, f"{where} is too large: this server takes request LoRAs of at most "
                                             f"{options.max_bytes} bytes (PARTICALIZE_REQUEST_LORA_MAX_BYTES)."
                          ) from None
        except FetchError as exc:
            raise TaskEnd(Outcome.BAD_INPUT, f"{where} could not be downloaded: {exc}") from None
        except CacheMismatch as exc:
            raise TaskEnd(Outcome.BAD_INPUT, f"{where}: {exc}") from None
        held.callback(file.release)
        downloaded += file.downloaded
        try:
            check([file.path])
        except LoraMismatch as exc:
            raise TaskEnd(Outcome.BAD_INPUT, f"{where} cannot be used: {exc}") from None
        files.append((file.path, lora.strength))
    return ReadyLoras(tuple(files), downloaded)
