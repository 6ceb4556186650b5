"""Start, await and stop a real `particalize serve` process (used by the end-to-end tests and the server
benchmark)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`particalize serve --model tiny` on loopback, configured only by `env` (no PARTICALIZE_* inherited)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        database_url: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        model: str = "tiny",
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url or f"sqlite:///{(data_dir / 'particalize.db').resolve()}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PARTICALIZE_")}
        full_env.update(PARTICALIZE_DATABASE_URL=self.database_url, **(env or {}))
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / f"serve-{self.port}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "particalize.cli", "serve", "--model", model, "--host", "127.0.0.1",
             "--port", str(self.port), "--data-dir", str(data_dir)],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=self.base, timeout=30)

    def wait_ready(self, not_pid: str | None = None, timeout: float = 90) -> dict[str, Any]:
        """Until the API answers and a worker (other than `not_pid`) has its model loaded; that worker."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                health = self.http.get("/healthz").json()
                ready = [w for w in health["workers"] if w["state"] in ("ready", "busy") and w["pid"] != not_pid]
                if ready:
                    return ready[0]
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self._log.close()
