"""Fleet soak: --tasks tasks through --workers simulated workers (benchmarks/fleet_sim.py, one process each) on a
private PostgreSQL, while --kills of the worker processes are SIGKILLed at random moments (each restarted under
its worker id a second later, as a supervisor would) and PostgreSQL is restarted once (a fast shutdown: every
connection cut, then started again). Tasks are queued all along, also during the restart.

At the end every task must be terminal; none lost (every task done, pexit 0, with its one output); none made twice
(one successful end and one output row per task); statuses only forward (within each attempt, a task's events go
forward along the lifecycle; only a requeue starts an attempt over; the terminal event is the last). It also counts
how many generations and output writes there were per task: a worker SIGKILLed after making a video but before
recording it leaves its task to be made again (that attempt is requeued): a task made (or stored) again is allowed
only if a SIGKILLed worker held it ("made_again_without_a_kill" must be empty: the database restart alone never
makes a video twice).

    python -m benchmarks.fleet_soak --label after                  # 2,000 tasks, 16 workers, 4 SIGKILLs
    python -m benchmarks.fleet_soak --tasks 200 --workers 4 --kills 1

tests/test_fleet_soak.py runs a short version in the suite. JSON: benchmarks/results/fleet-soak-<label>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select

from benchmarks.bench_fleet import Fleet, ready_workers, wait_until
from benchmarks.bench_server import machine
from server.store import Database, Store, StoreOptions, upgrade
from server.store.models import LIFECYCLE, QUEUED, RUNNING, TERMINAL, Output, Task, TaskEvent
from server.store.outage import StoreHealth
from tests.images import ImageServer
from tests.private_postgres import PrivateCluster
from tests.tasks import create_task

RESULTS_DIR = Path(__file__).resolve().parent / "results"
log = logging.getLogger("particalize.soak")


def rank(status: str) -> int:
    return LIFECYCLE.index(status) if status in LIFECYCLE else len(LIFECYCLE)


def backwards(statuses: list[str]) -> str | None:
    """Why this task's events are not forward only (None if they are): within an attempt (from a task_queue to the
    next) each status comes at or after the one before; a terminal status is the last event."""
    for index, (before, after) in enumerate(zip(statuses, statuses[1:], strict=False)):
        if before in TERMINAL:
            return f"{after} after the terminal {before} (event {index + 2})"
        if after != QUEUED and rank(after) < rank(before):
            return f"{before} -> {after} (event {index + 2})"
    return None


def soak(*, tasks: int, workers: int, kills: int, restart_database: bool, data: Path, steps: int = 2,
         step_seconds: float = 0.05, submit_batch: int = 25, lease_seconds: float = 15.0, requeue_limit: int = 3,
         timeout: float = 900.0, seed: int = 1) -> dict[str, Any]:
    """Run the soak; its findings (see the module's docstring)."""
    chance = random.Random(seed)
    cluster = PrivateCluster({"max_connections": str(max(100, workers * 12 + 40))})
    images = ImageServer(80, 48, "dog.png")
    fleet: Fleet | None = None
    started = time.monotonic()
    try:
        cluster.start()
        db = Database(cluster.url)
        upgrade(db)
        store = Store(db, StoreOptions(url=cluster.url, max_queue_length=tasks + 1))
        health = StoreHealth(log, what="soak")
        fleet = Fleet(cluster.url, workers, workers, data, step_seconds, lease_seconds=lease_seconds,
                      requeue_limit=requeue_limit, tag="soak")
        wait_until(lambda: ready_workers(store) >= workers, 300, f"{workers} workers ready", every=0.5)
        load_started = time.monotonic()
        queued: list[int] = []
        submitted = threading.Event()

        def submit() -> None:
            for first in range(0, tasks, submit_batch):
                for index in range(first, min(tasks, first + submit_batch)):
                    parameters = {"width": "32", "height": "32", "numFrames": "5", "steps": str(steps),
                                  "seed": str(index + 1)}
                    task = health.retry(lambda p=parameters: create_task(store, parameters=p, image_url=images.url),
                                        give_up=lambda: False)
                    queued.append(task.id)
                time.sleep(0.05)
            submitted.set()

        # The chaos lands while tasks flow: the kills spread over the expected run, the restart in its middle.
        expected = max(10.0, tasks * (steps * step_seconds + 0.15) / workers)
        plan = sorted([(chance.uniform(0.1, 0.8) * expected, "kill", index)
                       for index in chance.sample(range(workers), kills)]
                      + ([(0.45 * expected, "restart", -1)] if restart_database else []))
        chaos: list[dict[str, Any]] = []

        def cause_chaos() -> None:
            for at, what, index in plan:
                time.sleep(max(0.0, load_started + at - time.monotonic()))
                if what == "kill":  # while it holds a task (waiting up to 5 s for one), so that one is orphaned
                    worker_id = f"{fleet.children[index]['node']}/gpu0"
                    held: list[int] = []
                    until = time.monotonic() + 5.0
                    while not held and time.monotonic() < until:
                        with contextlib.suppress(Exception):  # the database restarting
                            held = health.call(lambda w=worker_id: running_under(store, w))
                        if not held:
                            time.sleep(0.01)
                    fleet.kill(index)
                    chaos.append({"at_s": round(time.monotonic() - load_started, 1), "what": "SIGKILL",
                                  "worker": worker_id, "holding": held})
                    time.sleep(1.0)
                    fleet.start(index)
                else:
                    cluster.stop()
                    down = time.monotonic()
                    time.sleep(3.0)
                    cluster.start()
                    chaos.append({"at_s": round(down - load_started, 1), "what": "PostgreSQL restarted",
                                  "down_s": round(time.monotonic() - down, 1)})

        threads = [threading.Thread(target=submit, name="submit"), threading.Thread(target=cause_chaos, name="chaos")]
        for thread in threads:
            thread.start()

        def all_terminal() -> bool:
            if not submitted.is_set():
                return False
            try:
                return health.call(lambda: sum(store.reads.count(s) for s in TERMINAL)) >= tasks
            except Exception:  # the database restarting
                return False

        wait_until(all_terminal, timeout, "every task to end", every=1.0)
        for thread in threads:
            thread.join()
        load_seconds = time.monotonic() - load_started
        findings = check(store, fleet, queued, killed_holding={t for c in chaos for t in c.get("holding", [])})
        fleet.stop()
        fleet = None
        db.dispose()
        return {"tasks": tasks, "workers": workers, "kills": kills, "database_restarts": int(restart_database),
                "steps": steps, "step_seconds": step_seconds, "lease_seconds": lease_seconds,
                "requeue_limit": requeue_limit, "chaos": chaos, "load_seconds": round(load_seconds, 1),
                "seconds": round(time.monotonic() - started, 1), **findings}
    finally:
        if fleet is not None:
            fleet.stop()
        images.close()
        cluster.remove()


def running_under(store: Store, worker_id: str) -> list[int]:
    with store.db.session() as s:
        return list(s.scalars(select(Task.id).where(Task.worker_id == worker_id, Task.status.in_(RUNNING))))


def check(store: Store, fleet: Fleet, queued: list[int], killed_holding: set[int]) -> dict[str, Any]:
    """The findings; `killed_holding`: the tasks SIGKILLed workers held (those may be made again, no other)."""
    with store.db.session() as s:
        rows = list(s.scalars(select(Task)))
        events = list(s.scalars(select(TaskEvent).order_by(TaskEvent.id)))
        outputs = Counter(o.task_id for o in s.scalars(select(Output)))
    of_task: dict[int, list[str]] = {}
    for event in events:
        of_task.setdefault(event.task_id, []).append(event.status)
    seeds = {t.id: int(t.request["params"]["seed"]) for t in rows}
    records = fleet.records()
    generated = Counter(int(r[1]) for r in records if r[0] == "generated")
    stored = Counter(r[1].split("/")[0] for r in records if r[0] == "stored")
    not_terminal = [t.id for t in rows if t.status not in TERMINAL]
    not_done = {t.id: f"{t.status} pexit {t.pexit}: {t.debugerror[:200]}" for t in rows
                if t.status in TERMINAL and not (t.status == "task_postprocess_end" and t.pexit == "0"
                                                  and outputs[t.id] == 1)}
    made_twice = [t.id for t in rows if outputs[t.id] > 1 or of_task.get(t.id, []).count("task_postprocess_end") > 1]
    not_forward = {t.id: why for t in rows if (why := backwards(of_task.get(t.id, []))) is not None}
    ends_elsewhere = [t.id for t in rows if of_task.get(t.id) and of_task[t.id][-1] != t.status]
    requeued = sum(1 for t in rows if of_task.get(t.id, []).count(QUEUED) > 1)
    made_again = {t.id for t in rows if (generated[seeds[t.id]] > 1 or stored[t.uuid] > 1)
                  and t.id not in killed_holding}
    return {
        "queued": len(queued),
        "in_store": len(rows),
        "done": len(rows) - len(not_done) - len(not_terminal),
        "not_terminal": len(not_terminal),
        "lost": len(not_done) + len(not_terminal) + (len(queued) - len(rows)),
        "lost_examples": dict(list(not_done.items())[:10]),
        "made_twice": len(made_twice),
        "not_forward": len(not_forward) + len(ends_elsewhere),
        "not_forward_examples": dict(list(not_forward.items())[:10]),
        "requeued_tasks": requeued,
        "generated_more_than_once": sorted(t.id for t in rows if generated[seeds[t.id]] > 1),
        "stored_more_than_once": sorted(t.id for t in rows if stored[t.uuid] > 1),
        "made_again_without_a_kill": sorted(made_again),
        "passed": not not_terminal and not not_done and not made_twice and not not_forward and not ends_elsewhere
        and not made_again and len(queued) == len(rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="run")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--no-restart", action="store_true", help="leave PostgreSQL running")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="fleet-soak-") as tmp:
        result = soak(tasks=args.tasks, workers=args.workers, kills=args.kills, restart_database=not args.no_restart,
                      data=Path(tmp), steps=args.steps, step_seconds=args.step_seconds, seed=args.seed)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "label": args.label,
              "machine": machine(), **result}
    print(json.dumps(record, indent=2))
    out = args.out or RESULTS_DIR / f"fleet-soak-{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
