"""The workers' disk cache of request LoRAs: files by content hash, a size bound held by evicting the least recently
used, shared by every worker process on the machine.

Layout under the cache folder: `blobs/<sha256>.safetensors` (the files), `urls/<sha256 of the URL>` (the content
hash a URL gave last time, so a URL seen before is not downloaded again) and `partial/` (downloads under way).

- Atomic: a download is written to `partial/`, hashed as it streams, synced, and only then linked under its content
  name; a half-written file is never under a name that is read.
- In use: a task holds a shared `flock` on each file it uses until its run ends; eviction takes an exclusive one
  without waiting and skips a file it cannot lock, so a running task's file is never removed. Locks end with
  their process: a crashed worker leaves no pin behind.
- Least recently used: a file's modification time is set at each use; eviction removes the oldest first until the
  files fit `max_bytes` (files in use may hold it above the bound until their tasks end).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("particalize.worker")

STALE_PARTIAL_SECONDS = 24 * 3600.0
"""A download left in `partial/` this long ago was a crashed process's: removed at the next eviction."""


class CacheMismatch(ValueError):
    """The downloaded file's content hash is not the one the request named."""


@dataclass
class HeldFile:
    """A cached file held for a task (a shared lock on it): not evicted until `release`."""

    path: Path
    sha256: str
    downloaded: bool
    """False: it was in the cache already."""
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the lock
            self.fd = -1


class _HashingWriter:
    """Writes to a file and hashes what it writes (the download's content hash, without reading it again)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()

    def write(self, chunk: bytes) -> int:
        self.hash.update(chunk)
        return self.out.write(chunk)


class LoraCache:
    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.blobs = self.folder / "blobs"
        self.urls = self.folder / "urls"
        self.partial = self.folder / "partial"
        for path in (self.blobs, self.urls, self.partial):
            path.mkdir(parents=True, exist_ok=True)

    def blob(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.safetensors"

    def _url_key(self, url: str) -> Path:
        return self.urls / hashlib.sha256(url.encode()).hexdigest()

    def known(self, url: str) -> str | None:
        """The content hash `url` gave when it was last downloaded, if any."""
        try:
            text = self._url_key(url).read_text().strip()
        except OSError:
            return None
        return text or None

    def get(self, url: str, sha256: str | None, download: Callable[[BinaryIO], int]) -> HeldFile:
        """The file of `url` held for a task: from the cache when its content (the named `sha256`, or the one the
        URL gave before) is there, else downloaded (`download(out)` writes it, raising what refuses it) and added.
        CacheMismatch when the download is not the named `sha256`."""
        key = sha256 or self.known(url)
        if key:
            held = self._hold(self.blob(key), key)
            if held is not None:
                os.utime(held.path)  # its last use, for eviction
                return held
        held = self._download(url, download)
        if sha256 and held.sha256 != sha256:
            held.release()
            raise CacheMismatch(f"{url} holds a file whose SHA-256 is {held.sha256}, not the {sha256} the request "
                                "named.")
        self._remember(url, held.sha256)
        self.evict()
        return held

    def _hold(self, path: Path, sha256: str, downloaded: bool = False) -> HeldFile | None:
        """A shared lock on `path`, or None when it is not there (or was evicted as it was opened)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return HeldFile(path, sha256, downloaded, fd)

    def _download(self, url: str, download: Callable[[BinaryIO], int]) -> HeldFile:
        """Into `partial/`, hashed as it is written, synced; locked, then linked under its content name (so no
        eviction can take it between the two, and a file under that name is never replaced)."""
        handle, name = tempfile.mkstemp(dir=self.partial, prefix="download-")
        partial = Path(name)
        try:
            with os.fdopen(handle, "wb") as out:
                writer = _HashingWriter(out)
                download(writer)  # type: ignore[arg-type]
                out.flush()
                os.fsync(out.fileno())
            digest = writer.hash.hexdigest()
            final = self.blob(digest)
            while True:
                fd = os.open(partial, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_SH)
                try:
                    os.link(partial, final)  # atomic, and never over a file another task may hold
                    held = HeldFile(final, digest, True, fd)
                    break
                except FileExistsError:  # another worker added the same content meanwhile: use theirs
                    os.close(fd)
                    existing = self._hold(final, digest, downloaded=True)
                    if existing is not None:
                        held = existing
                        break
        finally:
            partial.unlink(missing_ok=True)
        log.info("request LoRA %s downloaded (%d bytes, sha256 %s)", url, final.stat().st_size, digest)
        return held

    def _remember(self, url: str, sha256: str) -> None:
        handle, name = tempfile.mkstemp(dir=self.partial, prefix="url-")
        with os.fdopen(handle, "w") as out:
            out.write(sha256)
        os.replace(name, self._url_key(url))

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.blobs.glob("*.safetensors"))

    def evict(self) -> list[str]:
        """Remove the least recently used files that no task holds until the rest fit `max_bytes`; the content
        hashes removed."""
        entries = []
        for path in self.blobs.glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                entries.append((stat.st_mtime, path, stat.st_size))
        total = sum(size for _, _, size in entries)
        removed = []
        for _, path, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if self._remove_unheld(path):
                total -= size
                removed.append(path.stem)
        if removed:
            log.info("request LoRA cache: evicted %d file(s) (least recently used) to stay within %d bytes",
                     len(removed), self.max_bytes)
            self._forget_missing()
        self._clear_stale_partials()
        return removed

    @staticmethod
    def _remove_unheld(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a running task holds it
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return False
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def _forget_missing(self) -> None:
        """URL entries whose file is gone (evicted): a later request downloads it again."""
        for entry in self.urls.iterdir():
            with contextlib.suppress(OSError):
                if not self.blob(entry.read_text().strip()).exists():
                    entry.unlink()

    def _clear_stale_partials(self) -> None:
        cutoff = time.time() - STALE_PARTIAL_SECONDS
        for entry in self.partial.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
