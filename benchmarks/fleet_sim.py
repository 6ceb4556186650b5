"""Simulated workers for the fleet benchmark and soak: the real worker process code (server.worker.run_worker: the
store opened and migrated, registration, the claim loop, heartbeats, the orphan sweep, the kill watch, each task's
run and how it is recorded) with a generator that makes no video. A task "runs" `steps` x `step_seconds`, reporting
each step as the real pipeline does, and stops when the run's interrupt is set (waiting on it rather than polling,
so 256 simulated workers cost the CPU nothing while they "generate").

One child process hosts `--workers` of them, each in a thread with a store of its own (its own engine, pool and,
where the code has one, its own listening connection), as one `particalize worker` process per GPU has. The child
writes what the benchmark needs to know to `--records`, one line each: `interrupt <seed> <time>` when a run first
sees its interrupt, `generated <seed> <time>` when a run's denoising is over, `stored <relpath> <time>` when an
output goes into the storage.

    python -m benchmarks.fleet_sim --url postgresql://... --workers 32 --node sim3 --data DIR --records FILE
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import Interrupted
from server.storage import Storage, StorageOptions

Record = Callable[[str], None]


class Step:
    """What the pipeline reports after each denoising step (the fields the worker reads)."""

    def __init__(self, step: int, total: int, elapsed: float) -> None:
        self.step, self.total, self.elapsed = step, total, elapsed


class Made:
    """A generated "video": a few black frames, as the worker's finishing steps expect."""

    def __init__(self, params: Any, seconds: float) -> None:
        self.frames = np.zeros((params.num_frames, params.height, params.width, 3), dtype=np.float32)
        self.params = params
        self.timings = {"generate": seconds}
        self.notes: list[str] = []
        self.schedule = None


class Points:
    """Where a run stops: between "blocks" (the interrupt is waited on), as the real per-block hook does."""

    blocks_hooked = True
    blocks_entered = 1


class SimulatedGenerator:
    """The worker's Generator (server.worker.task_run.Generator) without a model: `steps` x `step_seconds` of
    waiting, interruptible at once."""

    device = "simulated"
    load_seconds = 0.0
    random_weights = False

    def __init__(self, step_seconds: float, record: Record) -> None:
        from pipeline.resolve import Modes

        self.step_seconds = step_seconds
        self.record = record
        self.modes = Modes()
        self.interrupt_points = Points()
        self.loras: list[Any] = []
        self.loaded_files: list[Any] = []
        self.degraded: list[str] = []

    def generate(self, params: Any, image: Any, progress: Any = None, should_stop: Any = None,
                 interrupt: Any = None, tool: str = "") -> Made:
        started = time.monotonic()
        # The run passes its interrupt Event's is_set: wait on the Event itself where it is one (no spinning).
        event = getattr(interrupt, "__self__", None)
        wait: Callable[[float], bool] = event.wait if isinstance(event, threading.Event) else \
            (lambda seconds: bool(time.sleep(seconds)) or bool(interrupt and interrupt()))
        total = params.steps
        for step in range(total):
            if wait(self.step_seconds):
                self.record(f"interrupt {params.seed} {time.time():.6f}")
                raise Interrupted(step, total)
            if progress is not None:
                progress(Step(step + 1, total, time.monotonic() - started))
            if should_stop is not None and should_stop():
                self.record(f"interrupt {params.seed} {time.time():.6f}")
                raise Interrupted(step + 1, total)
        self.record(f"generated {params.seed} {time.time():.6f}")
        return Made(params, time.monotonic() - started)


def line_recorder(path: Path) -> Record:
    stream = path.open("a", buffering=1)
    lock = threading.Lock()

    def record(line: str) -> None:
        with lock:
            stream.write(line + "\n")

    return record


def install_fakes(record: Record) -> None:
    """No MP4 encoding (a few bytes stand for the video), and every put into the storage recorded."""
    import server.worker.task_run as task_run

    def write_mp4(frames: Any, path: Path, fps: int, crf: int = 17) -> Path:
        path.write_bytes(b"simulated video\n")
        return path

    task_run.write_mp4 = write_mp4  # type: ignore[assignment]
    put_file = Storage.put_file

    def recorded_put(self: Storage, local_path: Path, relpath: str) -> None:
        put_file(self, local_path, relpath)
        record(f"stored {relpath} {time.time():.6f}")

    Storage.put_file = recorded_put  # type: ignore[method-assign]


def worker_options(url: str, node: str, *, lease_seconds: float, requeue_limit: int) -> Any:
    from pipeline.params import Limits
    from server.store import StoreOptions
    from server.worker import FetchOptions, WorkerOptions

    store = StoreOptions(url=url, lease_seconds=lease_seconds, requeue_limit=requeue_limit, max_queue_length=100_000)
    return WorkerOptions(node_name=node, model="simulated", version="fleet-sim", store=store,
                         limits=Limits(max_steps=100_000, max_work=10**15),
                         fetch=FetchOptions(allow_private_urls=True),  # the benchmark serves the image on loopback
                         min_free_disk_bytes=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--first-slot", type=int, default=0)
    parser.add_argument("--node", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--lease-seconds", type=float, default=60.0)
    parser.add_argument("--requeue-limit", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {args.node} %(levelname)s %(message)s")

    from server.worker.entry import run_worker

    record = line_recorder(args.records)
    install_fakes(record)
    storage = Storage(StorageOptions(url=str(args.data / "outputs"), base_url="http://127.0.0.1"))
    options = worker_options(args.url, args.node, lease_seconds=args.lease_seconds, requeue_limit=args.requeue_limit)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    codes: list[int] = []

    def one(slot: int) -> None:
        codes.append(run_worker(options, storage, lambda: SimulatedGenerator(args.step_seconds, record), stop,
                                slot=slot))

    threads = [threading.Thread(target=one, args=(args.first_slot + i,), name=f"worker-{i}", daemon=True)
               for i in range(args.workers)]
    for thread in threads:
        thread.start()
    parent = os.getppid()
    while not stop.wait(0.5) and any(t.is_alive() for t in threads):
        if os.getppid() != parent:  # the benchmark is gone
            stop.set()
    for thread in threads:
        thread.join()
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main())
