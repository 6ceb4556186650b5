"""The client against a real `particalize serve --model tiny`: upload, wait, download, decode."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from particalize.client import AuthError, Progress, TaskFailed, WiroClient, WiroError
from pipeline.video import read_mp4
from tests.images import png_bytes

pytestmark = pytest.mark.slow
KEY, SECRET = "e2e-key", "e2e-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {**os.environ, "PARTICALIZE_API_KEYS": f"{KEY}:{SECRET}", "PARTICALIZE_ALLOW_PRIVATE_URLS": "1",
           "PARTICALIZE_WEIGHTS_DIR": str(root / "weights")}
    log = open(root / "serve.log", "wb")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "particalize.cli", "serve", "--model", "tiny", "--port", str(port),
         "--data-dir", str(root / "data")],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_answering(url, proc, root / "serve.log")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_until_answering(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with WiroClient(KEY, SECRET, base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                client.detail("0")
            except WiroError as exc:
                if exc.code == 1:  # "There is no task yet.": the API is up and checks our signature
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.3)
    pytest.fail(f"the server did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def test_uploaded_image_to_downloaded_video(base_url, tmp_path):
    seen: list[Progress] = []
    with WiroClient(KEY, SECRET, base_url=base_url) as client:
        run = client.run({"numFrames": 5, "steps": 2, "width": 32, "height": 32, "fps": 8, "seed": 7},
                         image=png_bytes(40, 40))
        task = client.wait(run.taskid, poll_interval=0.1, timeout=180, on_progress=seen.append)
        assert task["status"] == "task_postprocess_end" and task["pexit"] == "0"
        assert task["socketaccesstoken"] == run.socketaccesstoken
        assert client.detail(tasktoken=run.socketaccesstoken)["id"] == run.taskid
        paths = client.download(task, tmp_path)
    assert [p.name for p in paths] == ["0.mp4"]
    meta, frames = read_mp4(paths[0])
    assert frames.shape == (5, 32, 32, 3) and meta["fps"] == 8
    assert int(task["outputs"][0]["size"]) == paths[0].stat().st_size
    assert seen[-1].status == "task_postprocess_end" and seen[-1].percentage == 100.0


def test_an_undecodable_upload_fails_with_its_reason(base_url):
    with WiroClient(KEY, SECRET, base_url=base_url) as client, pytest.raises(WiroError) as info:
        run = client.run({"numFrames": 5, "steps": 1, "width": 32, "height": 32}, image=b"\x89PNG\r\n\x1a\n junk")
        client.wait(run.taskid, poll_interval=0.1, timeout=60)
    error = info.value
    reason = error.debugerror if isinstance(error, TaskFailed) else error.message
    assert "inputImage" in reason


def test_a_wrong_secret_is_an_auth_error(base_url):
    with WiroClient(KEY, "not-the-secret", base_url=base_url) as client, pytest.raises(AuthError) as info:
        client.detail("1")
    assert info.value.status_code == 401
