"""The workers' disk cache of request LoRAs (server/lora_cache.py): files by content hash, a URL seen before not
downloaded again, a size bound held by evicting the least recently used file no task holds, and no half-written
file ever under a name that is read."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from server.lora_cache import CacheMismatch, LoraCache

SIZE = 1000


def body(n: int) -> bytes:
    return bytes([n % 251]) * SIZE


class Downloads:
    """A stand-in for the guarded download: writes the URL's bytes, counting the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def of(self, url: str, data: bytes | None = None):
        def download(out) -> int:
            self.calls.append(url)
            out.write(data if data is not None else body(int(url.rsplit("/", 1)[1])))
            return SIZE
        return download


def add(cache: LoraCache, downloads: Downloads, n: int, sha256: str | None = None):
    url = f"http://host/{n}"
    held = cache.get(url, sha256, downloads.of(url))
    return held


def test_a_file_is_stored_under_its_content_hash_and_a_url_seen_before_is_not_downloaded_again(tmp_path: Path):
    cache, downloads = LoraCache(tmp_path, 10 * SIZE), Downloads()
    first = add(cache, downloads, 1)
    assert first.downloaded and first.sha256 == hashlib.sha256(body(1)).hexdigest()
    assert first.path == tmp_path / "blobs" / f"{first.sha256}.safetensors" and first.path.read_bytes() == body(1)
    first.release()
    again = add(cache, downloads, 1)
    assert not again.downloaded and again.path == first.path and downloads.calls == ["http://host/1"]
    by_hash = cache.get("http://elsewhere/copy", first.sha256, downloads.of("http://elsewhere/copy"))
    assert not by_hash.downloaded and by_hash.path == first.path and len(downloads.calls) == 1


def test_a_download_whose_hash_is_not_the_named_one_is_refused(tmp_path: Path):
    cache, downloads = LoraCache(tmp_path, 10 * SIZE), Downloads()
    with pytest.raises(CacheMismatch, match="not the 0000"):
        add(cache, downloads, 2, sha256="0" * 64)


def test_a_failed_download_leaves_nothing_behind(tmp_path: Path):
    cache = LoraCache(tmp_path, 10 * SIZE)

    def breaks(out) -> int:
        out.write(b"half a file")
        raise ConnectionError("cut off")

    with pytest.raises(ConnectionError):
        cache.get("http://host/broken", None, breaks)
    assert list((tmp_path / "blobs").iterdir()) == [] and list((tmp_path / "partial").iterdir()) == []
    assert cache.known("http://host/broken") is None


def test_eviction_keeps_the_cache_within_its_size_removing_the_least_recently_used(tmp_path: Path):
    cache, downloads = LoraCache(tmp_path, int(2.5 * SIZE)), Downloads()
    hashes = {}
    for n in range(1, 5):
        held = add(cache, downloads, n)
        hashes[n] = held.sha256
        held.release()
        os.utime(held.path, (time.time() - 100 + n, time.time() - 100 + n))  # distinct use times, 1 the oldest
        if n == 2:
            add(cache, downloads, 1).release()  # 1 used again: 2 is now the least recently used
            os.utime(cache.blob(hashes[1]), (time.time() - 50, time.time() - 50))
        assert cache.size() <= cache.max_bytes
    present = {path.stem for path in (tmp_path / "blobs").iterdir()}
    assert present == {hashes[1], hashes[4]}
    assert cache.known("http://host/2") is None  # its URL entry went with it: the next request downloads it again
    add(cache, downloads, 2).release()
    assert downloads.calls.count("http://host/2") == 2


def test_a_file_a_running_task_holds_is_never_evicted(tmp_path: Path):
    cache, downloads = LoraCache(tmp_path, int(1.5 * SIZE)), Downloads()
    running = add(cache, downloads, 1)  # held, as by a task's run
    os.utime(running.path, (time.time() - 100, time.time() - 100))
    for n in (2, 3):
        add(cache, downloads, n).release()
    assert running.path.exists()  # the oldest, but held: the others went instead
    assert cache.size() <= cache.max_bytes + SIZE
    running.release()
    cache.evict()
    assert not running.path.exists() and cache.size() <= cache.max_bytes
