"""Fleet benchmark: what N workers cost one PostgreSQL, and how fast the fleet answers, for N = 1, 16, 64, 256.

The workers are simulated (benchmarks/fleet_sim.py): the real worker code on the real store, with a generator that
makes no video (a task "runs" steps x --step-seconds). They run in up to --processes child processes, each worker
with a store, pool and connections of its own, as one `particalize worker` per GPU has. One real API replica
(`particalize serve --workers 0`, API keys on) answers the HTTP requests. Everything runs against a PostgreSQL
cluster the benchmark starts itself (initdb in a temporary directory, a free port; never the shared server), with
pg_stat_statements to count the API replica's queries apart (it connects as its own role).

Per N it measures:
- database transactions per second (pg_stat_database, the slope of 1 s samples) with every worker idle, and with
  every worker busy on a long task; per worker, after taking off the API replica alone (N = 0, measured first);
- Run -> task_accept: from just before Run is sent to the API to the accepttime the worker stamped (p50/p99);
- Kill -> the worker's interrupt: from just before Task/Kill is sent to the moment the running task's interrupt
  is set in the worker (p50/p99);
- Task/Detail under 32 closed-loop pollers (signed requests) with the fleet idle;
- live followers: --followers Server-Sent-Event streams on the API replica, spread over the N running tasks, and the
  queries per second the API replica sends the database meanwhile (pg_stat_statements of its role), less those it
  sends while idle (its callback sender's polls), measured with the fleet idle.

    python -m benchmarks.bench_fleet --label after                # N = 1, 16, 64, 256 (~10 min on 2 cores)
    python -m benchmarks.bench_fleet --fleet 1,16 --label quick --idle-seconds 10
    python -m benchmarks.bench_fleet --soak --label after         # the soak (benchmarks/fleet_soak.py) instead

Writes benchmarks/results/fleet-postgresql-<label>.json (soak: fleet-soak-<label>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.bench_server import RUN, Connection, detail_load, machine, percentile, serve_env
from benchmarks.harness import ROOT, ServeProcess
from server.store import Database, Store, StoreOptions, upgrade
from server.store.models import RUNNING, TERMINAL
from tests.images import ImageServer
from tests.private_postgres import PrivateCluster, unavailable_reason
from tests.tasks import create_task

RESULTS_DIR = Path(__file__).resolve().parent / "results"
API_ROLE = "particalize_api"
DATABASE = "fleet"
TARGETS = {"idle_transactions_per_second_per_worker": 1.0, "run_to_accept_p50_ms_at_256": 50.0,
           "kill_to_interrupt_p99_ms": 100.0, "followers_1000_queries_per_second": 5.0}


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


class FleetDatabase:
    """The private cluster: the benchmark's database, a role for the API replica, pg_stat_statements."""

    def __init__(self, max_connections: int) -> None:
        self.cluster = PrivateCluster({"max_connections": str(max_connections),
                                       "shared_preload_libraries": "pg_stat_statements",
                                       "pg_stat_statements.track_utility": "off"})
        self.cluster.start()
        base = self.cluster.url
        self.admin_url = _plain(base)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
            conn.execute(f"CREATE ROLE {API_ROLE} LOGIN SUPERUSER")
        self.url = base.rsplit("/", 1)[0] + f"/{DATABASE}"
        self.api_url = self.url.replace("postgres@", f"{API_ROLE}@")
        self.sampler = psycopg.connect(_plain(self.url), autocommit=True)
        self.sampler.execute("CREATE EXTENSION pg_stat_statements")
        db = Database(self.url)
        upgrade(db)
        db.dispose()

    def transactions(self) -> int:
        """Committed and rolled-back transactions of the database so far (one of them this read's own)."""
        row = self.sampler.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                                   (DATABASE,)).fetchone()
        return int(row[0]) if row else 0

    def api_queries(self) -> int:
        """Statements the API replica's role has run so far (pg_stat_statements, BEGIN/COMMIT not counted)."""
        row = self.sampler.execute(
            "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
            "WHERE r.rolname = %s", (API_ROLE,)).fetchone()
        return int(row[0]) if row else 0

    def reset_tables(self) -> None:
        self.sampler.execute("TRUNCATE tasks, task_events, outputs, uploads, workers, nonces CASCADE")

    def close(self) -> None:
        self.sampler.close()
        self.cluster.remove()


def slope(read: Callable[[], int], seconds: float, every: float = 1.0, own_per_read: int = 0) -> float:
    """Per second: the least-squares slope of `read()` sampled every `every` seconds for `seconds` (each read adding
    `own_per_read` itself, taken off)."""
    points: list[tuple[float, float]] = []
    start = time.monotonic()
    while True:
        now = time.monotonic()
        points.append((now - start, read() - own_per_read * len(points)))
        if now - start >= seconds:
            break
        time.sleep(max(0.0, start + len(points) * every - time.monotonic()))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


class Fleet:
    """N simulated workers in child processes (benchmarks/fleet_sim.py)."""

    def __init__(self, url: str, count: int, processes: int, data: Path, step_seconds: float, *,
                 lease_seconds: float = 60.0, requeue_limit: int = 1, tag: str = "") -> None:
        self.url, self.count, self.data = url, count, data
        self.step_seconds, self.lease_seconds, self.requeue_limit = step_seconds, lease_seconds, requeue_limit
        per = [count // processes + (1 if i < count % processes else 0) for i in range(min(processes, count))]
        self.children: list[dict[str, Any]] = []
        for i, workers in enumerate(per):
            self.children.append({"node": f"sim{tag}{i}", "workers": workers,
                                  "records": data / f"records-{tag}{i}.txt", "proc": None})
        for index in range(len(self.children)):
            self.start(index)

    def start(self, index: int) -> None:
        """(Re)start child `index` under the same node name: a restarted worker finds its previous life's tasks."""
        child = self.children[index]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARTICALIZE_")}
        (self.data / "tmp").mkdir(exist_ok=True)
        env["TMPDIR"] = str(self.data / "tmp")  # its scratch files apart from everything else on the machine
        log = (self.data / f"{child['node']}.log").open("ab")
        child["proc"] = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.fleet_sim", "--url", self.url, "--workers", str(child["workers"]),
             "--node", child["node"], "--data", str(self.data), "--records", str(child["records"]),
             "--step-seconds", str(self.step_seconds), "--lease-seconds", str(self.lease_seconds),
             "--requeue-limit", str(self.requeue_limit)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self, index: int) -> None:
        proc = self.children[index]["proc"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def records(self) -> list[list[str]]:
        lines: list[list[str]] = []
        for child in self.children:
            with contextlib.suppress(FileNotFoundError):
                lines += [line.split() for line in child["records"].read_text().splitlines() if line.strip()]
        return lines

    def stop(self, timeout: float = 60) -> None:
        for child in self.children:
            if child["proc"].poll() is None:
                child["proc"].send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child["proc"].wait(timeout)
            except subprocess.TimeoutExpired:
                child["proc"].kill()
                child["proc"].wait()


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def ready_workers(store: Store) -> int:
    return sum(1 for w in store.workers.all() if w.state == "ready")


def running(store: Store) -> int:
    return sum(store.reads.count(status) for status in RUNNING)


def ms_summary(seconds: list[float]) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in seconds)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(ms[-1], 1)}


async def run_to_accept(api: Connection, store: Store, image_url: str, trials: int) -> dict[str, Any]:
    """Single tasks on an idle fleet: Run sent -> the accepttime the claiming worker stamped. Also names the last
    task (`taskid`), for the Detail pollers."""
    latencies, task_id = [], 0
    for i in range(trials):
        await asyncio.sleep(0.3)
        sent = time.time()
        _, answer = await api.post(RUN, {"inputImageUrl": image_url, "width": 32, "height": 32, "numFrames": 5,
                                         "steps": 1, "seed": 900_000 + i})
        task_id = int(answer["taskid"])
        task = store.reads.get(task_id)
        while task is None or not task.accepttime:
            await asyncio.sleep(0.002)
            task = store.reads.get(task_id)
        latencies.append(task.accepttime - sent)
        while task.status not in TERMINAL:  # the fleet is idle again before the next trial
            await asyncio.sleep(0.02)
            task = store.reads.get(task_id)
    return {**ms_summary(latencies), "taskid": str(task_id)}


async def kill_to_interrupt(api: Connection, store: Store, fleet: Fleet, image_url: str, trials: int,
                            ) -> dict[str, Any]:
    """A long task running: Task/Kill sent -> the worker's run sees its interrupt set (recorded by the generator)."""
    latencies, answers = [], []
    for i in range(trials):
        seed = 800_000 + i
        _, answer = await api.post(RUN, {"inputImageUrl": image_url, "width": 32, "height": 32, "numFrames": 5,
                                         "steps": 100, "seed": seed})
        task_id = int(answer["taskid"])
        while (task := store.reads.get(task_id)) is None or task.status != "task_output":
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        sent = time.time()
        _, killed = await api.post("/v1/Task/Kill", {"taskid": str(task_id)})
        answers.append(time.time() - sent)
        assert killed["tasklist"][0]["status"] == "task_cancel", killed
        deadline = time.monotonic() + 30
        while True:
            seen = [float(r[2]) for r in fleet.records() if r[0] == "interrupt" and r[1] == str(seed)]
            if seen:
                latencies.append(seen[0] - sent)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} was never interrupted")
            await asyncio.sleep(0.005)
    return {**ms_summary(latencies), "kill_answer_p50_ms": round(statistics.median(answers) * 1000, 1)}


class Follower:
    """One Server-Sent-Events stream of a task, counting the event messages it gets."""

    def __init__(self) -> None:
        self.messages = 0
        self.status = 0
        self.first = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, port: int, token: str) -> None:
        try:
            reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
            self.writer.write(f"GET /v1/Task/Events?tasktoken={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await self.writer.drain()
            self.status = int((await reader.readline()).split()[1])
            if self.status != 200:
                self.first.set()
                return
            while chunk := await reader.read(65536):
                self.messages += chunk.count(b"data: ")
                if self.messages:
                    self.first.set()
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            pass
        finally:
            self.first.set()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def followers_cost(port: int, db: FleetDatabase, tokens: list[str], count: int, seconds: float,
                         ) -> dict[str, Any]:
    """`count` SSE followers spread over the tasks of `tokens`; the API replica's queries per second meanwhile."""
    followers = [Follower() for _ in range(count)]
    tasks = []
    for i, follower in enumerate(followers):
        tasks.append(asyncio.create_task(follower.run(port, tokens[i % len(tokens)])))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(asyncio.gather(*(f.first.wait() for f in followers)), timeout=120)
        refused = sum(1 for f in followers if f.status != 200)
        await asyncio.sleep(2.0)  # every replay sent; now only following
        before = sum(f.messages for f in followers)
        qps = await asyncio.to_thread(slope, db.api_queries, seconds)
        delivered = sum(f.messages for f in followers) - before
    finally:
        for follower in followers:
            follower.close()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"followers": count, "refused": refused, "following": count - refused, "tasks": len(tokens),
            "api_queries_per_second": round(qps, 2), "messages_per_second": round(delivered / seconds, 1)}


async def measure_n(n: int, db: FleetDatabase, api_server: ServeProcess, store: Store, images: ImageServer,
                    args: argparse.Namespace, data: Path, baseline: float) -> dict[str, Any]:
    fleet = Fleet(db.url, n, args.processes, data, args.step_seconds, tag=f"n{n}-")
    result: dict[str, Any] = {"workers": n}
    try:
        await phases(n, db, api_server, store, images, args, fleet, baseline, result)
    except Exception as exc:  # a phase that fails is recorded; the next N still runs
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"N = {n}: {result['error']}", flush=True)
    finally:
        fleet.stop()
    db.reset_tables()
    return result


async def phases(n: int, db: FleetDatabase, api_server: ServeProcess, store: Store, images: ImageServer,
                 args: argparse.Namespace, fleet: Fleet, baseline: float, result: dict[str, Any]) -> None:
    wait_until(lambda: ready_workers(store) >= n, 600, f"{n} workers ready", every=0.5)
    time.sleep(args.settle_seconds)  # longer than PostgreSQL's 10 s stats flush: start-up is not counted
    api_before = db.api_queries()
    idle = slope(db.transactions, args.idle_seconds, own_per_read=1)
    result["idle_api_queries_per_second"] = round((db.api_queries() - api_before) / args.idle_seconds, 2)
    result["idle_transactions_per_second"] = round(idle, 1)
    result["idle_transactions_per_second_per_worker"] = round((idle - baseline) / n, 3)

    api = Connection(api_server.port)
    result["run_to_accept"] = await run_to_accept(api, store, images.url, args.run_trials)
    result["detail_32_pollers"] = await detail_load(api_server.port, result["run_to_accept"].pop("taskid"), 32,
                                                    args.detail_seconds, 0.0)
    result["kill_to_interrupt"] = await kill_to_interrupt(api, store, fleet, images.url, args.kill_trials)
    wait_until(lambda: running(store) == 0, 60, "the killed tasks to end")

    busy_tasks = [create_task(store, parameters={"width": "32", "height": "32", "numFrames": "5",
                                                 "steps": "1000", "seed": str(700_000 + i)},
                              image_url=images.url) for i in range(n)]
    wait_until(lambda: store.reads.count("task_output") >= n, 300, f"{n} tasks generating", every=0.2)
    busy = slope(db.transactions, args.busy_seconds, own_per_read=1)
    result["busy_transactions_per_second"] = round(busy, 1)
    result["busy_transactions_per_second_per_worker"] = round((busy - baseline) / n, 3)
    tokens = [t.socketaccesstoken for t in busy_tasks]
    live = result["live_followers"] = await followers_cost(api_server.port, db, tokens, args.followers,
                                                           args.follower_seconds)
    # what following costs: the API replica's queries less those it makes anyway (its callback sender's polls)
    live["followers_queries_per_second"] = round(live["api_queries_per_second"]
                                                 - result["idle_api_queries_per_second"], 2)
    for task in busy_tasks:
        store.tasks.request_kill(task.id)
    wait_until(lambda: running(store) == 0, 120, "the busy tasks to end")
    api.close()


def table(record: dict[str, Any]) -> str:
    rows = ["| N | idle tx/s | idle tx/s per worker | busy tx/s per worker | Run->accept p50 / p99 ms | "
            "Kill->interrupt p50 / p99 ms | Detail 32 pollers req/s, p99 ms | followers (following) | "
            "API queries/s (of which following) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in record["results"]:
        if "error" in r:
            rows.append(f"| {r['workers']} | {r.get('error')} (see the JSON for the phases measured) |")
            continue
        run, kill, detail, live = r["run_to_accept"], r["kill_to_interrupt"], r["detail_32_pollers"], \
            r["live_followers"]
        rows.append(f"| {r['workers']} | {r['idle_transactions_per_second']} | "
                    f"{r['idle_transactions_per_second_per_worker']} | {r['busy_transactions_per_second_per_worker']} "
                    f"| {run['p50_ms']} / {run['p99_ms']} | {kill['p50_ms']} / {kill['p99_ms']} | "
                    f"{detail['throughput_rps']}, {detail['p99_ms']} | {live['followers']} ({live['following']}) | "
                    f"{live['api_queries_per_second']} ({live.get('followers_queries_per_second', '?')}) |")
    return "\n".join(rows)


async def scenario(args: argparse.Namespace, db: FleetDatabase, data: Path) -> dict[str, Any]:
    images = ImageServer(80, 48, "dog.png")
    api_server = ServeProcess(data / "api", database_url=db.api_url, args=["--workers", "0"],
                              env={**serve_env(), "PARTICALIZE_NODE_NAME": "api"})
    store = Store(Database(db.url), StoreOptions(url=db.url, max_queue_length=100_000))
    try:
        api_server.wait_up()
        time.sleep(args.settle_seconds)
        baseline = slope(db.transactions, args.idle_seconds, own_per_read=1)
        results: list[dict[str, Any]] = []
        for n in args.fleet:
            print(f"N = {n} ...", flush=True)
            results.append(await measure_n(n, db, api_server, store, images, args, data, baseline))
            print(json.dumps(results[-1]), flush=True)
            save_partial({"api_alone_transactions_per_second": round(baseline, 2), "results": results})
        return {"api_alone_transactions_per_second": round(baseline, 2), "results": results}
    finally:
        store.db.dispose()
        api_server.stop()
        images.close()


PARTIAL: dict[str, Any] = {}


def save_partial(measured: dict[str, Any]) -> None:
    """After each N: the results so far, so that a run cut short keeps them."""
    if PARTIAL:
        PARTIAL["path"].write_text(json.dumps({**PARTIAL["record"], **measured, "partial": True}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="run", help="names the JSON file (e.g. before, after)")
    parser.add_argument("--fleet", default="1,16,64,256", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--processes", type=int, default=8, help="child processes the workers are spread over")
    parser.add_argument("--step-seconds", type=float, default=1.0, help="a simulated denoising step")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--busy-seconds", type=float, default=20.0)
    parser.add_argument("--settle-seconds", type=float, default=15.0)
    parser.add_argument("--run-trials", type=int, default=20)
    parser.add_argument("--kill-trials", type=int, default=10)
    parser.add_argument("--detail-seconds", type=float, default=5.0)
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--follower-seconds", type=float, default=10.0)
    parser.add_argument("--max-connections", type=int, default=1200)
    parser.add_argument("--soak", action="store_true", help="run the soak instead (benchmarks/fleet_soak.py)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"cannot start a private PostgreSQL: {reason}", file=sys.stderr)
        return 2
    if args.soak:
        from benchmarks.fleet_soak import main as soak_main

        return soak_main(["--label", args.label])

    started = time.monotonic()
    out = args.out or RESULTS_DIR / f"fleet-postgresql-{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    PARTIAL.update(path=out, record={"label": args.label, "machine": machine(),
                                     "settings": {k: v for k, v in vars(args).items() if k not in ("out", "soak")}})
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        db = FleetDatabase(args.max_connections)
        try:
            measured = asyncio.run(scenario(args, db, Path(tmp)))
        finally:
            db.close()
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "label": args.label,
        "machine": machine(),
        "store": "postgresql",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "soak")},
        "targets": TARGETS,
        "seconds": round(time.monotonic() - started, 1),
        **measured,
    }
    print(f"fleet benchmark ({args.label}), {record['date']}, {os.cpu_count()} CPUs, PostgreSQL, "
          f"API replica alone: {measured['api_alone_transactions_per_second']} tx/s")
    print(table(record))
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
