"""The worker's temporary folders for an MP4 being encoded: named for the process that made them, so that a worker
starting up removes what a killed worker left (SIGKILL runs no cleanup) and never a folder a live worker is using."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("particalize.worker")

PREFIX = "particalize-output-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def output_folder(root: Path | None = None) -> Iterator[Path]:
    """A fresh folder for one output, removed afterwards (as tempfile.TemporaryDirectory), named for this process."""
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-", dir=root or Path(tempfile.gettempdir())) as tmp:
        yield Path(tmp)


def remove_abandoned(root: Path | None = None) -> list[Path]:
    """Remove the output folders whose process is gone (the ones a killed worker left); the removed ones."""
    removed = []
    for folder in (root or Path(tempfile.gettempdir())).glob(f"{PREFIX}*"):
        pid = folder.name.removeprefix(PREFIX).split("-", 1)[0]
        if not folder.is_dir() or (pid.isdigit() and _alive(int(pid))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    if removed:
        log.info("removed %d temporary output folder(s) left by stopped workers", len(removed))
    return removed
