"""Start, await and stop real `particalize serve` and `particalize worker` processes (used by the end-to-end
and scale-out tests and the server benchmark)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(env: dict[str, str] | None, database_url: str) -> dict[str, str]:
    """This process's environment without any PARTICALIZE_* setting, then the database and `env`."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PARTICALIZE_")}
    full.update(PARTICALIZE_DATABASE_URL=database_url, **(env or {}))
    return full


class _Process:
    """A CLI subcommand in a child process, its output in a log file under the data directory."""

    proc: subprocess.Popen
    log_path: Path

    def _start(self, argv: list[str], env: dict[str, str], name: str, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "particalize.cli", *argv], cwd=ROOT, env=env, stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _end(self, sig: int, timeout: float) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class ServeProcess(_Process):
    """`particalize serve --model tiny` on loopback, configured only by `env` (no PARTICALIZE_* inherited);
    `args` are more flags (e.g. ["--workers", "0"] for an API replica)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        database_url: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        model: str = "tiny",
        args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url or f"sqlite:///{(data_dir / 'particalize.db').resolve()}"
        self._start(
            ["serve", "--model", model, "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(data_dir),
             *args],
            _clean_env(env, self.database_url), f"serve-{self.port}", data_dir,
        )
        self.http = httpx.Client(base_url=self.base, timeout=30)

    def wait_up(self, timeout: float = 60) -> None:
        """Until the API answers GET /health with 200 (the process and its database are up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not up after {timeout}s:\n{self.log_text()}")

    def wait_ready(self, not_pid: str | None = None, timeout: float = 90) -> dict[str, Any]:
        """Until the API answers and a worker (other than `not_pid`) has its model loaded; that worker."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                health = self.http.get("/healthz").json()
                ready = [w for w in health["workers"] if w["state"] in ("ready", "busy") and w["pid"] != not_pid]
                if ready:
                    return ready[0]
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> None:
        """Signal it and wait; SIGKILL after `timeout` (by default more than its request drain plus its workers'
        grace period and margin at the default 30 s grace)."""
        self._end(sig, timeout)
        self.http.close()


class WorkerProcess(_Process):
    """`particalize worker --model tiny` against `database_url`, writing outputs under `data_dir`, configured
    only by `env` (set PARTICALIZE_NODE_NAME to tell several apart: the worker id is <node>/gpu<slot>)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        database_url: str,
        env: dict[str, str] | None = None,
        model: str = "tiny",
        slot: int = 0,
    ) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        node = (env or {}).get("PARTICALIZE_NODE_NAME", "node").replace("/", "_")
        self._start(
            ["worker", "--model", model, "--data-dir", str(data_dir), "--slot", str(slot)],
            _clean_env(env, database_url), f"worker-{node}-{slot}", data_dir,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        self._end(sig, timeout)
