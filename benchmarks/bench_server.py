"""Server benchmark: is the API fast while a video is being made, and how soon does an idle worker start?

Starts the real `particalize serve --model tiny` (API keys configured, so every request is HMAC-checked and
its nonce checked against the clock), then measures:

- Task/Detail latency (p50/p99/max) and throughput with 32 concurrent pollers, each sending the page's curl
  request (JSON text as multipart/form-data, fresh nonce, signature) back to back (closed loop: the worst
  case), and paced (each poller every 100 ms), while the worker is generating a long video; and, for
  comparison, on an idle server;
- Run -> task_start on an idle server: from just before the Run request is sent to the time the worker
  stamped task_start (read from the task store), over repeated single tasks whose image URL is fetched from
  a loopback HTTP server as a real client's would be;
- Task/Kill of the running video: time to the answer that shows task_cancel.

The load generator is a minimal asyncio HTTP/1.1 client (keep-alive connections, no client library), so that
the measurement is the server's time rather than the client's; it runs on the same machine.

    python -m benchmarks.bench_server                    # SQLite (the default store)
    python -m benchmarks.bench_server --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.harness import ServeProcess
from server.auth import sign
from server.store import Database, Store
from tests.images import ImageServer

KEY, SECRET = "bench-key", "bench-secret"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUN = "/v1/Run/codexq/Particalize"
TARGET_DETAIL_P99_MS = 50.0
TARGET_RUN_TO_START_MS = 100.0
_nonce = itertools.count(int(time.time() * 1000))


def headers(path: str, body: bytes, port: int) -> bytes:
    nonce = str(next(_nonce))
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data\r\n"
        f"x-api-key: {KEY}\r\nx-nonce: {nonce}\r\nx-signature: {sign(KEY, SECRET, nonce)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection; uvicorn answers with content-length."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        for attempt in range(2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            assert self.reader is not None
            self.writer.write(headers(path, json.dumps(payload).encode(), self.port))
            await self.writer.drain()
            status_line = await self.reader.readline()
            if status_line:
                break
            self.close()  # the server closed an idle keep-alive connection: reconnect once
            if attempt:
                raise ConnectionError("the server closed the connection")
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return int(status_line.split()[1]), json.loads(body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def serve_env(access_log: bool = False) -> dict[str, str]:
    """Settings of the benchmarked server: API keys (every request is HMAC-checked and its nonce recorded),
    image URLs on loopback allowed (the benchmark serves the input image itself), access log off by default."""
    return dict(PARTICALIZE_API_KEYS=f"{KEY}:{SECRET}", PARTICALIZE_ALLOW_PRIVATE_URLS="1",
                PARTICALIZE_ACCESS_LOG="1" if access_log else "0")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summary(latencies: list[float], seconds: float, errors: int) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(ms),
        "errors": errors,
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(ms) / seconds, 1),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
    }


async def detail_load(port: int, taskid: str, pollers: int, seconds: float, interval: float) -> dict[str, Any]:
    """`pollers` clients polling Task/Detail for `seconds`; interval 0 = back to back."""
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def poller(index: int) -> None:
        nonlocal errors
        conn = Connection(port)
        await asyncio.sleep(interval * index / pollers)  # spread paced pollers over the interval
        try:
            while (now := time.perf_counter()) < end:
                status, body = await conn.post("/v1/Task/Detail", {"taskid": taskid})
                took = time.perf_counter() - now
                latencies.append(took)
                if status != 200 or body.get("result") is not True:
                    errors += 1
                if interval:
                    await asyncio.sleep(max(0.0, interval - took))
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(poller(i) for i in range(pollers)))
    return summary(latencies, time.perf_counter() - started, errors)


async def wait_status(conn: Connection, taskid: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = await conn.post("/v1/Task/Detail", {"taskid": taskid})
        task = body["tasklist"][0]
        if task["status"] in statuses:
            return task
        await asyncio.sleep(0.01)
    raise TimeoutError(f"task {taskid} not in {statuses}")


async def run_to_start(port: int, store: Store, image_url: str, repeats: int) -> dict[str, Any]:
    conn = Connection(port)
    to_start, run_answer = [], []
    body = {"inputImageUrl": image_url, "width": 32, "height": 32, "numFrames": 5, "steps": 1, "seed": 1}
    for _ in range(repeats):
        await asyncio.sleep(0.3)  # idle: the worker is back to polling the queue
        sent = time.time()
        _, run = await conn.post(RUN, body)
        run_answer.append(time.time() - sent)
        await wait_status(conn, run["taskid"], ("task_postprocess_end", "task_cancel"))
        task = store.reads.get(int(run["taskid"]))
        assert task is not None and task.pexit == "0", task and task.debugerror
        to_start.append(task.starttime - sent)
    conn.close()
    ms = sorted(x * 1000 for x in to_start)
    return {
        "repeats": repeats,
        "run_to_start_p50_ms": round(statistics.median(ms), 1),
        "run_to_start_p90_ms": round(percentile(ms, 90), 1),
        "run_to_start_max_ms": round(max(ms), 1),
        "run_answer_p50_ms": round(statistics.median(x * 1000 for x in run_answer), 1),
    }


async def scenario(server: ServeProcess, store: Store, args: argparse.Namespace) -> dict[str, Any]:
    port = server.port
    images = ImageServer(80, 48, "dog.png")
    conn = Connection(port)
    results: dict[str, Any] = {}

    _, warm = await conn.post(RUN, {"inputImageUrl": images.url, "width": 32, "height": 32, "numFrames": 5,
                                    "steps": 1})
    await wait_status(conn, warm["taskid"], ("task_postprocess_end",))
    results["detail_idle"] = await detail_load(port, warm["taskid"], args.pollers, args.seconds / 2, 0.0)

    results["run_to_start_idle"] = await run_to_start(port, store, images.url, args.repeats)

    # ~0.5 s per denoising step on the tiny model at this size: still generating after both load phases
    long_body = {"inputImageUrl": images.url, "width": 320, "height": 192, "numFrames": 81, "steps": 100}
    _, long = await conn.post(RUN, long_body)
    await wait_status(conn, long["taskid"], ("task_output",))
    for name, interval in (("detail_generating", 0.0), ("detail_generating_paced_100ms", 0.1)):
        steps_before = len([e for e in store.reads.events(int(long["taskid"])) if e.status == "task_output"])
        results[name] = await detail_load(port, long["taskid"], args.pollers, args.seconds, interval)
        steps_after = len([e for e in store.reads.events(int(long["taskid"])) if e.status == "task_output"])
        _, body = await conn.post("/v1/Task/Detail", {"taskid": long["taskid"]})
        status = body["tasklist"][0]["status"]
        assert status == "task_output", f"the video must still be generating: {body}"
        results[name]["denoising_steps_during"] = steps_after - steps_before

    started = time.perf_counter()
    _, killed = await conn.post("/v1/Task/Kill", {"taskid": long["taskid"]})
    results["kill"] = {
        "answer_ms": round((time.perf_counter() - started) * 1000, 1),
        "status": killed["tasklist"][0]["status"],
        "debugoutput": killed["tasklist"][0]["debugoutput"],
    }
    conn.close()
    images.close()
    return results


def table(results: dict[str, Any]) -> str:
    rows = ["| measurement | requests | req/s | p50 ms | p99 ms | max ms | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("detail_idle", "detail_generating", "detail_generating_paced_100ms"):
        r = results[name]
        rows.append(f"| Task/Detail, {name.removeprefix('detail_').replace('_', ' ')}, 32 pollers | {r['requests']} | "
                    f"{r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['errors']} |")
    s = results["run_to_start_idle"]
    rows.append(f"| Run -> task_start, idle server ({s['repeats']} runs) | {s['repeats']} | | "
                f"{s['run_to_start_p50_ms']} | {s['run_to_start_p90_ms']} (p90) | {s['run_to_start_max_ms']} | 0 |")
    rows.append(f"| Run answer | {s['repeats']} | | {s['run_answer_p50_ms']} | | | |")
    k = results["kill"]
    rows.append(f"| Task/Kill of the running video -> {k['status']} | 1 | | {k['answer_ms']} | | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: SQLite in a temporary data directory")
    parser.add_argument("--pollers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each Detail load phase")
    parser.add_argument("--repeats", type=int, default=20, help="Run -> start measurements")
    parser.add_argument("--access-log", action="store_true", help="keep uvicorn's access log on")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        server = ServeProcess(Path(tmp) / "data", database_url=args.database_url, env=serve_env(args.access_log))
        try:
            server.wait_ready()
            store = Store(Database(server.database_url))
            results = asyncio.run(scenario(server, store, args))
            store.db.dispose()
        finally:
            server.stop()
    backend = "postgresql" if args.database_url else "sqlite"
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "store": backend,
        "pollers": args.pollers,
        "access_log": args.access_log,
        "targets": {"detail_p99_ms_generating": TARGET_DETAIL_P99_MS, "run_to_start_ms": TARGET_RUN_TO_START_MS},
        "results": results,
    }
    print(f"server benchmark, {record['date']}, {os.cpu_count()} CPUs, store {backend}, model tiny")
    print(table(results))
    out = args.out or RESULTS_DIR / f"server-{backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
