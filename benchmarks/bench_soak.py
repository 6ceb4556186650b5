"""Soak benchmark: does the server stay correct and flat under minutes of sustained Run + Task/Detail load?

Starts the real `particalize serve --model tiny` (API keys configured, so every request is HMAC-checked and
its nonce checked against the clock) and, for `--seconds` (default 300) on loopback, applies:

- `--runners` closed-loop clients (default 4), each submitting a Run (a small tiny-model video whose image URL
  is fetched from a loopback HTTP server), polling its own task with Task/Detail every `--poll-interval`
  until the task ends, then submitting the next one: the queue stays short and the worker always busy;
- `--pollers` paced clients (default 16), each sending Task/Detail every `--poll-interval` for one of the
  recently submitted tasks (queued, running or done).

Every `--sample-seconds` it reads the resident memory (VmRSS in /proc/<pid>/status) of the serve process and
of its worker child process(es), and the serve process's open file descriptors. It reports throughput
(Run/s, Detail/s), p50/p99/max latency per route, error responses (target 0), tasks completed or failed,
and memory growth: the average of the first and of the last window (one minute, or a third of a shorter
run) and a least-squares slope in MiB/min over the samples after the first window (target: flat).

The total request count is bounded (`--max-requests`): when it is reached no new request starts. Linux only
(/proc). The HTTP client and the signing helpers are those of `bench_server`.

    python -m benchmarks.bench_soak                          # SQLite, 300 s
    python -m benchmarks.bench_soak --seconds 30             # a smoke run
    python -m benchmarks.bench_soak --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.bench_server import RESULTS_DIR, RUN, Connection, machine, serve_env, summary
from benchmarks.harness import ServeProcess
from benchmarks.memory import rss_bytes
from server.store.models import TERMINAL
from tests.images import ImageServer

DETAIL = "/v1/Task/Detail"
ROUTES = {RUN: "Run", DETAIL: "Task/Detail"}
TASK_TIMEOUT_SECONDS = 120.0
TARGET_ERRORS = 0
TARGET_SLOPE_MIB_PER_MIN = 1.0
"""Memory counts as flat when the total (serve + workers) grows by at most this much per minute."""
MIB = 1024 * 1024


@dataclass
class RouteStats:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])


@dataclass
class Tasks:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    unfinished: int = 0
    failure_samples: list[str] = field(default_factory=list)


class Load:
    """The shared state of the load clients: deadline, request budget, per-route statistics, recent tasks."""

    def __init__(self, port: int, seconds: float, max_requests: int) -> None:
        self.port = port
        self.deadline = time.perf_counter() + seconds
        self.budget = max_requests
        self.stats = {route: RouteStats() for route in ROUTES}
        self.tasks = Tasks()
        self.recent: collections.deque[str] = collections.deque(maxlen=64)

    def running(self) -> bool:
        return time.perf_counter() < self.deadline and self.budget > 0

    async def call(self, conn: Connection, route: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """One signed request; the body when it succeeded (HTTP 200, result true), else None (counted)."""
        self.budget -= 1
        stats = self.stats[route]
        started = time.perf_counter()
        try:
            status, body = await conn.post(route, payload)
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            conn.close()  # the connection's state is unknown: the next call opens a new one
            stats.latencies.append(time.perf_counter() - started)
            stats.error(f"{type(exc).__name__}: {exc}")
            return None
        stats.latencies.append(time.perf_counter() - started)
        if status != 200 or body.get("result") is not True:
            stats.error(f"HTTP {status}: {json.dumps(body)}")
            return None
        return body


async def runner(load: Load, image_url: str, poll_interval: float) -> None:
    """Closed loop: Run, poll the task until it ends, repeat."""
    conn = Connection(load.port)
    try:
        while load.running():
            body = {"inputImageUrl": image_url, "width": 32, "height": 32, "numFrames": 5, "steps": 1,
                    "seed": random.randrange(2**31)}
            run = await load.call(conn, RUN, body)
            if run is None:
                await asyncio.sleep(poll_interval)
                continue
            taskid = str(run["taskid"])
            load.tasks.submitted += 1
            load.recent.append(taskid)
            await follow(load, conn, taskid, poll_interval)
    finally:
        conn.close()


async def follow(load: Load, conn: Connection, taskid: str, poll_interval: float) -> None:
    """Poll one task until it is in a terminal status (also after the deadline: no task is left behind)."""
    give_up = time.perf_counter() + TASK_TIMEOUT_SECONDS
    while time.perf_counter() < give_up:
        await asyncio.sleep(poll_interval)
        detail = await load.call(conn, DETAIL, {"taskid": taskid})
        if detail is None:
            continue
        task = detail["tasklist"][0]
        if task["status"] not in TERMINAL:
            continue
        if task["status"] == "task_cancel":
            load.tasks.cancelled += 1
        elif task["pexit"] == "0" and task["outputs"]:
            load.tasks.completed += 1
        else:
            load.tasks.failed += 1
            if len(load.tasks.failure_samples) < 5:
                load.tasks.failure_samples.append(f"task {taskid}: pexit {task['pexit']}: {task['debugerror']}")
        return
    load.tasks.unfinished += 1


async def poller(load: Load, index: int, count: int, interval: float) -> None:
    """Paced: Task/Detail of a recent task every `interval`."""
    conn = Connection(load.port)
    await asyncio.sleep(interval * index / count)  # spread the pollers over the interval
    try:
        while load.running():
            if not load.recent:
                await asyncio.sleep(interval)
                continue
            sent = time.perf_counter()
            await load.call(conn, DETAIL, {"taskid": random.choice(load.recent)})
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - sent)))
    finally:
        conn.close()


# --- memory --------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError):
            found += [int(child) for child in task.read_text().split()]
    return sorted(set(found))


def open_fds(pid: int) -> int | None:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except (FileNotFoundError, PermissionError):
        return None


@dataclass
class Sample:
    t: float
    serve: int
    workers: int
    worker_pids: list[int]
    fds: int | None


async def sampler(pid: int, every: float, stop: asyncio.Event, samples: list[Sample]) -> None:
    started = time.perf_counter()
    while True:
        serve = rss_bytes(pid)
        if serve is None:
            return
        pids = children(pid)
        workers = sum(rss_bytes(child) or 0 for child in pids)
        samples.append(Sample(time.perf_counter() - started, serve, workers, pids, open_fds(pid)))
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except asyncio.TimeoutError:
            pass


def growth(times: list[float], values: list[int], window: float) -> dict[str, Any]:
    """First- and last-window averages (MiB) and the least-squares slope (MiB/min) after the first window."""
    points = list(zip(times, [v / MIB for v in values], strict=True))
    mib = [v for _, v in points]
    end = times[-1]
    first = [v for t, v in points if t <= window] or mib[:1]
    last = [v for t, v in points if t >= end - window] or mib[-1:]
    steady = [(t, v) for t, v in points if t >= window]
    if len(steady) < 3:  # too short to leave out the warm-up window: fit every sample
        steady = points
    slope = None
    if len(steady) >= 2 and steady[0][0] != steady[-1][0]:
        slope = statistics.linear_regression([t / 60 for t, _ in steady], [v for _, v in steady]).slope
    return {
        "first_window_avg_mib": round(statistics.fmean(first), 1),
        "last_window_avg_mib": round(statistics.fmean(last), 1),
        "growth_mib": round(statistics.fmean(last) - statistics.fmean(first), 1),
        "slope_mib_per_min": None if slope is None else round(slope, 3),
        "slope_from_s": round(steady[0][0], 1),
        "min_mib": round(min(mib), 1),
        "max_mib": round(max(mib), 1),
    }


def memory_report(samples: list[Sample], window: float) -> dict[str, Any]:
    times = [s.t for s in samples]
    report = {
        "samples": len(samples),
        "window_s": round(window, 1),
        "serve": growth(times, [s.serve for s in samples], window),
        "workers": growth(times, [s.workers for s in samples], window),
        "total": growth(times, [s.serve + s.workers for s in samples], window),
        "worker_pids_seen": sorted({pid for s in samples for pid in s.worker_pids}),
    }
    fds = [s.fds for s in samples if s.fds is not None]
    if fds:
        report["serve_open_fds"] = {"first": fds[0], "last": fds[-1], "max": max(fds)}
    return report


# --- the run -------------------------------------------------------------------------------------------


async def soak(server: ServeProcess, args: argparse.Namespace) -> dict[str, Any]:
    images = ImageServer(80, 48, "dog.png")
    try:
        # one task first, so that the model is loaded and every code path warm before anything is measured
        warm = Load(server.port, TASK_TIMEOUT_SECONDS, 10_000)
        conn = Connection(server.port)
        run = await warm.call(conn, RUN, {"inputImageUrl": images.url, "width": 32, "height": 32, "numFrames": 5,
                                          "steps": 1})
        if run is None:
            raise RuntimeError(f"the warm-up Run failed: {warm.stats[RUN].error_samples}")
        await follow(warm, conn, str(run["taskid"]), 0.05)
        conn.close()
        if warm.tasks.completed != 1:
            raise RuntimeError(f"the warm-up task did not complete: {warm.tasks}")

        samples: list[Sample] = []
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler(server.proc.pid, args.sample_seconds, stop, samples))
        load = Load(server.port, args.seconds, args.max_requests)
        started = time.perf_counter()
        clients = [runner(load, images.url, args.poll_interval) for _ in range(args.runners)]
        clients += [poller(load, i, args.pollers, args.poll_interval) for i in range(args.pollers)]
        await asyncio.gather(*clients)
        seconds = time.perf_counter() - started
        stop.set()
        await sampling
    finally:
        images.close()

    routes = {}
    for route, name in ROUTES.items():
        stats = load.stats[route]
        routes[name] = summary(stats.latencies, seconds, stats.errors) if stats.latencies else {"requests": 0}
        routes[name]["error_samples"] = stats.error_samples
    window = min(60.0, seconds / 3)
    return {
        "seconds": round(seconds, 1),
        "budget_exhausted": load.budget <= 0,
        "routes": routes,
        "tasks": vars(load.tasks),
        "memory": memory_report(samples, window) if len(samples) >= 2 else {"samples": len(samples)},
    }


def verdicts(results: dict[str, Any]) -> dict[str, str]:
    errors = sum(r.get("errors", 0) for r in results["routes"].values())
    tasks = results["tasks"]
    slope = results["memory"].get("total", {}).get("slope_mib_per_min")
    return {
        "errors": "PASS" if errors <= TARGET_ERRORS else f"FAIL ({errors} error responses)",
        "tasks": "PASS" if tasks["failed"] == tasks["unfinished"] == tasks["cancelled"] == 0 else "FAIL",
        "memory": "n/a (too few samples)" if slope is None else
        ("PASS" if slope <= TARGET_SLOPE_MIB_PER_MIN else f"CHECK (+{slope} MiB/min)"),
    }


def table(results: dict[str, Any]) -> str:
    rows = ["| route | requests | req/s | p50 ms | p99 ms | max ms | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results["routes"].items():
        if r["requests"]:
            rows.append(f"| {name} | {r['requests']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | "
                        f"{r['max_ms']} | {r['errors']} |")
    t = results["tasks"]
    rows += ["", f"tasks: {t['submitted']} submitted, {t['completed']} completed, {t['failed']} failed, "
                 f"{t['cancelled']} cancelled, {t['unfinished']} unfinished after {TASK_TIMEOUT_SECONDS:.0f} s"]
    mem = results["memory"]
    if "total" in mem:
        window = f"{mem['window_s']:.0f} s"
        rows += ["", f"| RSS ({mem['samples']} samples) | first {window} avg MiB | last {window} avg MiB | "
                     "growth MiB | slope MiB/min | min MiB | max MiB |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in ("serve", "workers", "total"):
            g = mem[name]
            rows.append(f"| {name} | {g['first_window_avg_mib']} | {g['last_window_avg_mib']} | {g['growth_mib']} | "
                        f"{g['slope_mib_per_min']} (from {g['slope_from_s']} s) | {g['min_mib']} | {g['max_mib']} |")
        if "serve_open_fds" in mem:
            fds = mem["serve_open_fds"]
            rows.append(f"\nserve open file descriptors: first {fds['first']}, last {fds['last']}, max {fds['max']}; "
                        f"worker pids seen: {mem['worker_pids_seen']}")
    for name, verdict in results["verdicts"].items():
        rows.append(f"{name}: {verdict}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: SQLite in a temporary data directory")
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the load (default 300)")
    parser.add_argument("--runners", type=int, default=4, help="closed-loop Run clients (default 4)")
    parser.add_argument("--pollers", type=int, default=16, help="paced Task/Detail clients (default 16)")
    parser.add_argument("--poll-interval", type=float, default=0.05,
                        help="seconds between two requests of one poller or runner (default 0.05)")
    parser.add_argument("--sample-seconds", type=float, default=2.0, help="memory sampling period (default 2)")
    parser.add_argument("--max-requests", type=int, default=500_000, help="no request starts past this many")
    parser.add_argument("--access-log", action="store_true", help="keep uvicorn's access log on")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not Path("/proc/self/status").exists():
        parser.error("needs Linux /proc to sample memory")

    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        server = ServeProcess(Path(tmp) / "data", database_url=args.database_url, env=serve_env(args.access_log))
        try:
            server.wait_ready()
            results = asyncio.run(soak(server, args))
        finally:
            server.stop()
    results["verdicts"] = verdicts(results)
    store = "postgresql" if args.database_url else "sqlite"
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "store": store,
        "load": {"seconds": args.seconds, "runners": args.runners, "pollers": args.pollers,
                 "poll_interval_s": args.poll_interval, "max_requests": args.max_requests,
                 "sample_seconds": args.sample_seconds, "access_log": args.access_log,
                 "run_body": "32x32, 5 frames, 1 step, tiny model, image URL on loopback"},
        "targets": {"errors": TARGET_ERRORS, "memory_slope_mib_per_min": TARGET_SLOPE_MIB_PER_MIN},
        "results": results,
    }
    print(f"soak benchmark, {record['date']}, {record['machine']['cpus']} CPUs, store {store}, model tiny, "
          f"{results['seconds']} s, {args.runners} runners + {args.pollers} pollers every {args.poll_interval} s")
    print(table(results))
    out = args.out or RESULTS_DIR / f"soak-{store}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if any(v.startswith("FAIL") for v in results["verdicts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
