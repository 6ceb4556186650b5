"""Memory check: do unauthenticated uploads cost the API process memory?

The signature covers headers only, so the server authenticates (and applies the rate limit) before it reads any
body: a stranger's upload must cost no memory beyond its headers. This starts the real `particalize serve
--model tiny --workers 0` (API keys configured; the API is then one process), and in phases sends `--clients`
concurrent uploads of `--mib` MiB each (multipart, streamed in 256 KiB chunks, Content-Length declared):

- `no-auth-headers`: no x-api-key;
- `bad-signature`: a configured key with a wrong x-signature;
- `signed` (for comparison): correctly signed, so each body is read (up to max_body_bytes) and then refused as
  a malformed upload.

For each phase it samples the API process's RSS every 10 ms and reports the baseline, the peak and the growth,
what the clients managed to send, and the answers. It prints a table, writes JSON to
benchmarks/results/unauth-memory.json, and exits 1 when an unauthenticated phase grew the RSS by more than
`--max-growth-mib` (default 64 MiB: generous, as 32 x 20 MiB = 640 MiB are sent).

    python -m benchmarks.bench_unauth_memory                 # 32 clients x 20 MiB, ~30 s
    python -m benchmarks.bench_unauth_memory --clients 64 --mib 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.harness import ServeProcess
from benchmarks.memory import rss_bytes
from server.auth import sign

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KEY, SECRET = "bench-memory-key", "bench-memory-secret"
CHUNK = 256 * 1024
BOUNDARY = "benchboundary"


def serve_rss(pid: int) -> int:
    """The serve process's RSS; it must be alive while it is measured."""
    rss = rss_bytes(pid)
    if rss is None:
        raise RuntimeError(f"no VmRSS for process {pid}: the server has gone")
    return rss


class RssSampler:
    """The process's RSS every `every` seconds, in a thread, while it runs; the peak seen."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, serve_rss(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self.peak = serve_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def auth_headers(kind: str) -> str:
    nonce = str(int(time.time() * 1000))
    if kind == "no-auth-headers":
        return ""
    secret = SECRET if kind == "signed" else "not-the-secret"
    return f"x-api-key: {KEY}\r\nx-nonce: {nonce}\r\nx-signature: {sign(KEY, secret, nonce)}\r\n"


async def upload(port: int, kind: str, size: int) -> dict[str, Any]:
    """One upload of `size` bytes; how much of it went out before the server answered or closed, and the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/File/Upload HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{auth_headers(kind)}"
        f"content-type: multipart/form-data; boundary={BOUNDARY}\r\ncontent-length: {size}\r\n\r\n"
    ).encode()
    sent = 0
    status = 0
    chunk = b"\0" * CHUNK

    async def read_status() -> int:
        line = await reader.readline()
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1") else 0

    answer = asyncio.ensure_future(read_status())
    try:
        writer.write(head)
        while sent < size and not answer.done():
            piece = chunk[: min(CHUNK, size - sent)]
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
        status = await asyncio.wait_for(answer, 60)
    except (ConnectionError, asyncio.TimeoutError, OSError):
        status = answer.result() if answer.done() and not answer.exception() else status
    finally:
        answer.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return {"sent": sent, "status": status}


async def phase(port: int, pid: int, kind: str, clients: int, size: int) -> dict[str, Any]:
    await asyncio.sleep(1.0)  # let the previous phase's buffers go
    baseline = serve_rss(pid)
    started = time.perf_counter()
    with RssSampler(pid) as sampler:
        results = await asyncio.gather(*(upload(port, kind, size) for _ in range(clients)))
        await asyncio.sleep(0.2)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    mib = 1024 * 1024
    return {
        "clients": clients,
        "body_mib": size / mib,
        "seconds": round(time.perf_counter() - started, 2),
        "sent_mib_total": round(sum(r["sent"] for r in results) / mib, 1),
        "statuses": statuses,
        "rss_baseline_mib": round(baseline / mib, 1),
        "rss_peak_mib": round(sampler.peak / mib, 1),
        "rss_growth_mib": round((sampler.peak - baseline) / mib, 1),
    }


def table(results: dict[str, Any]) -> str:
    rows = [("phase", "clients x MiB", "sent MiB", "answers", "RSS base", "RSS peak", "growth MiB")]
    for name, r in results.items():
        rows.append((name, f"{r['clients']} x {r['body_mib']:g}", f"{r['sent_mib_total']:g}",
                     ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items())),
                     f"{r['rss_baseline_mib']:g}", f"{r['rss_peak_mib']:g}", f"{r['rss_growth_mib']:g}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--mib", type=float, default=20.0, help="body size of each upload (below max_body_bytes)")
    parser.add_argument("--max-growth-mib", type=float, default=64.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "unauth-memory.json")
    args = parser.parse_args(argv)
    size = int(args.mib * 1024 * 1024)

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        server = ServeProcess(Path(tmp) / "data", env={"PARTICALIZE_API_KEYS": f"{KEY}:{SECRET}",
                                                       "PARTICALIZE_ACCESS_LOG": "0"}, args=["--workers", "0"])
        try:
            server.wait_up()
            results = {}
            for kind in ("no-auth-headers", "bad-signature", "signed"):
                results[kind] = asyncio.run(phase(server.port, server.pid, kind, args.clients, size))
        finally:
            server.stop()

    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "threshold_growth_mib": args.max_growth_mib,
        "results": results,
    }
    print(f"unauthenticated upload memory, {record['date']}, {os.cpu_count()} CPUs")
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    failed = [k for k in ("no-auth-headers", "bad-signature") if results[k]["rss_growth_mib"] > args.max_growth_mib]
    for kind in failed:
        print(f"FAIL: {kind} grew the API process by {results[kind]['rss_growth_mib']} MiB "
              f"(threshold {args.max_growth_mib} MiB)")
    bad_answers = [k for k in ("no-auth-headers", "bad-signature") if set(results[k]["statuses"]) != {"401"}]
    for kind in bad_answers:
        print(f"FAIL: {kind} was answered {results[kind]['statuses']}, not 401 for every upload")
    return 1 if failed or bad_answers else 0


if __name__ == "__main__":
    sys.exit(main())
