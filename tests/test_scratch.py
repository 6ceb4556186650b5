"""A worker's temporary output folders: a SIGKILLed worker's are removed when a worker starts, a live one's never."""

from __future__ import annotations

import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from particalize.compose_server import open_services, open_storage
from particalize.core_options import worker_options
from server.worker import Worker
from server.worker.scratch import PREFIX, output_folder, remove_abandoned
from tests.conftest import make_settings


def ended_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_a_folder_of_an_ended_process_is_removed_and_a_live_ones_is_kept(scratch: Path):
    abandoned = scratch / f"{PREFIX}{ended_pid()}-x1"
    abandoned.mkdir()
    (abandoned / "0.mp4").write_bytes(b"half an mp4")
    other = scratch / "someone-elses"
    other.mkdir()
    with output_folder() as mine:
        assert mine.parent == scratch and mine.name.startswith(f"{PREFIX}")
        assert remove_abandoned() == [abandoned]
        assert mine.is_dir() and other.is_dir() and not abandoned.exists()
    assert not mine.exists()


def test_a_starting_worker_removes_what_a_killed_worker_left(scratch: Path, tmp_path: Path):
    abandoned = scratch / f"{PREFIX}{ended_pid()}-y2"
    abandoned.mkdir()
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}")
    services = open_services(settings)
    worker = Worker(services.store, open_storage(settings), object(), worker_options(settings),
                    worker_id="scratch/gpu0")
    stop = threading.Event()
    stop.set()
    worker.run(stop)
    assert not abandoned.exists()
