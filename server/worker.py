"""The GPU worker: claims the oldest queued task and walks it through Wiro's whole lifecycle.

queue -> accept (claimed) -> preprocess_start (fetch and check the image) -> preprocess_end -> assign
-> start -> output (the current step in debugoutput, repeated) -> output_full -> end
-> postprocess_start (encode the MP4, store it) -> postprocess_end (pexit 0 and the output).

Task/Kill ends the task in task_cancel at once (server/store); the worker notices within one transformer
block (a watcher thread turns the store's flag into an event the pipeline checks before every block and every
VAE encoder and decoder call), throws the run away and leaves no output behind, also when the kill comes during the VAE
decode or the MP4 write; any
failure ends in task_postprocess_end with pexit 1 and the reason in debugerror. Either way the model
stays loaded and the worker takes the next task. One worker per GPU; `run_worker` is the entry of both
`particalize worker` and the workers `particalize serve` starts.

A graceful stop (SIGTERM, see server/shutdown.py) claims nothing more at once, lets the running task
finish within settings.shutdown_grace_seconds, and past that interrupts it at its next step and puts it
back in the queue; then `run_worker` returns 0. Once denoising has finished, the video is decoded, stored and
recorded even past the grace period (bounded by settings.shutdown_finish_seconds): it is never thrown away.

A store outage (see server/store/outage.py) fails nothing: the worker claims nothing while it lasts, keeps
what it has made, and records it when the store answers again; it logs once when the outage starts and once
when it ends. A worker also claims nothing while its disks are below settings.min_free_disk_bytes (state
"paused", saying why), so no GPU time is spent on a video that could not be written.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from pipeline.errors import Interrupted, InvalidParameter
from pipeline.images import decode_image
from pipeline.params import GenerationParams, parse_params, size_for_image
from pipeline.video import write_mp4
from server.errors import public_text
from server.netguard import FetchError, UnsafeUrl, fetch_url
from server.shutdown import finish_overdue, stop_due
from server.storage import OUTPUT_NAME, OUTPUT_TYPE, Storage, StorageError, disk_space_problem
from server.store import NewOutput, TaskKilled, TaskLost, TaskStore, open_store
from server.store.models import (
    ASSIGN,
    END,
    OUTPUT,
    OUTPUT_FULL,
    POSTPROCESS_START,
    PREPROCESS_END,
    PREPROCESS_START,
    START,
    Task,
)
from server.store.outage import StoreHealth, is_outage
from server.store.tasks import parameters_of
from server.worker_reports import Report

log = logging.getLogger("particalize.worker")

EXIT_LOAD_FAILED = 3
"""`particalize worker` exits with this when the model cannot be loaded (restarting would not help)."""

KILL_POLL_SECONDS = 0.1
"""How often the kill watcher reads the task's kill flag while a task runs (bounds kill-to-stop with the time of
one transformer block)."""

IMAGE_TYPES_REFUSED = ("text/", "application/json", "application/xml", "application/javascript")


class Generator(Protocol):
    device: Any

    def resolve(self, params: GenerationParams, image: Image.Image) -> GenerationParams: ...

    def generate(self, params: GenerationParams, image: Image.Image, progress: Any = None,
                 should_stop: Any = None, interrupt: Any = None) -> Any: ...


class _Killed(Exception):
    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


class _Stopping(Exception):
    """The worker is shutting down: the task goes back to the queue."""


class _Failed(Exception):
    """The task cannot be done; the message is what the client reads in debugerror."""


def worker_id_for(settings: Any, slot: int) -> str:
    return f"{settings.node_name}/gpu{slot}"


def failure_reason(exc: BaseException) -> str:
    """What a client reads in debugerror for an exception the worker did not expect (no server paths in it)."""
    text = public_text(exc) or type(exc).__name__
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return (
            f"Out of memory while generating ({text}); ask for fewer frames (numFrames), a smaller "
            "width/height or fewer steps, or try again when the GPU is less busy."
        )
    return f"Internal error: {type(exc).__name__}: {text}"


class Worker:
    def __init__(
        self,
        store: TaskStore,
        storage: Storage,
        generator: Generator,
        settings: Any,
        *,
        worker_id: str,
        fetch: Callable[..., tuple[bytes, str]] = fetch_url,
        report: Report | None = None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.generator = generator
        self.settings = settings
        self.worker_id = worker_id
        self.fetch = fetch
        from particalize.compose import limits  # until the worker takes typed options (issue 16, part A)

        self.limits = limits(settings)
        self.stop_event = threading.Event()
        self._finished = threading.Event()
        self.current_task: int | None = None
        self.tasks_done = 0
        self.health = StoreHealth(log)
        self._denoised = threading.Event()
        """Set once the running task's last denoising step is done (its video is then finished, not requeued)."""
        self._state_lock = threading.Lock()  # the heartbeat's "stopping" mark never lands after the task's end
        self.paused_for: str | None = None
        self.report: Report = report or (lambda state, detail: None)
        """Tells the serve process that started this worker when it pauses and goes on (server/worker_reports.py),
        which /ready believes also when the store cannot be written."""
        self._state_unwritten = False
        """The store has not taken the last pause or resume yet (it could not be written): retried, quietly."""
        self._next_state_try = 0.0

    # --- the loop --------------------------------------------------------------------------------

    def run(self, stop_event: threading.Event, parent_pid: int | None = None) -> None:
        """Until `stop_event`: take the oldest queued task, do it, repeat (polling when idle). Once it is set
        no task is claimed; the running one goes on until the stop is due (see server/shutdown.py)."""
        self.stop_event = stop_event
        self._finished.clear()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        self.recover(own=True)
        sweep_every = max(1.0, min(10.0, self.store.lease_seconds / 4))
        next_sweep = time.monotonic() + sweep_every
        while not stop_event.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.error("the serve process that started this worker is gone; exiting")
                os._exit(1)
            try:
                # Right after an outage, leases look expired only because no heartbeat could be written: give
                # every live worker one lease to renew its own before taking any task away from it.
                if time.monotonic() >= max(next_sweep, self.health.back_at + self.store.lease_seconds):
                    self.health.call(lambda: self.recover(own=False))
                    next_sweep = time.monotonic() + sweep_every
                # Paused, the worker touches the store only to record that (which may fail quietly): that is no
                # news of the store's health, so it is not counted as such.
                worked = False if self._paused() else self.health.call(self._claim_and_process)
            except SQLAlchemyError as exc:
                if not is_outage(exc):
                    log.exception("database error in the worker loop; retrying in 1 s")
                stop_event.wait(1.0)  # an outage was logged once by self.health; the next try is the probe
                continue
            if not worked:
                stop_event.wait(self.settings.worker_poll_seconds)
        self._finished.set()
        heartbeat.join(timeout=2)

    def recover(self, own: bool) -> None:
        """Requeue (or fail) tasks whose worker died: at start our own previous life's, then expired leases."""
        for item in self.store.recover_orphans(worker_id=self.worker_id if own else None):
            log.warning("task %s %s (it was held by %s, which stopped)", item.task_id, item.action, item.worker_id,
                        extra={"task_id": item.task_id})

    def run_once(self) -> bool:
        """Claim and do one task; False when the queue is empty or the disks are below their floor."""
        if self._paused():
            return False
        return self._claim_and_process()

    def _claim_and_process(self) -> bool:
        task = self.store.claim_next(self.worker_id)
        if task is None:
            return False
        self.current_task = task.id
        try:
            self.process(task)
        finally:
            self.tasks_done += 1
            with self._state_lock:
                self.current_task = None
                try:
                    self.health.call(lambda: self.store.worker_state(
                        self.worker_id, "stopping" if self.stop_event.is_set() else "ready"))
                except SQLAlchemyError as exc:
                    if not is_outage(exc):
                        log.exception("could not record the worker state")
        return True

    def resources_problem(self) -> str | None:
        """Why an output could not be written now (a disk below settings.min_free_disk_bytes), or None. The
        message names no server path: a client reads it in debugerror."""
        needed = self.settings.min_free_disk_bytes
        scratch = Path(tempfile.gettempdir())
        problem = disk_space_problem(scratch, needed, "the worker's temporary directory")
        return problem or self.storage.space_problem(needed)

    def _paused(self) -> bool:
        """Under the disk floor the worker claims nothing (state "paused", the reason in its detail, which /ready
        shows), and resumes by itself once there is room: one log line each way, and one report to the serve
        process, whether or not the store can take the new state now (SQLite on that very disk may not)."""
        problem = self.resources_problem()
        if (problem is None) != (self.paused_for is None):  # a change of state, not of the free bytes it names
            self.paused_for = problem
            if problem:
                log.warning("worker %s claims no task: %s", self.worker_id, problem)
            else:
                log.warning("worker %s has room to write outputs again; claiming tasks", self.worker_id)
            self.report(*self._pause_state())
            self._state_unwritten, self._next_state_try = True, 0.0
        if self._state_unwritten and time.monotonic() >= self._next_state_try:
            self._write_pause_state()
        return problem is not None

    def _pause_state(self) -> tuple[str, str]:
        if self.paused_for:
            return "paused", self.paused_for
        return ("stopping" if self.stop_event.is_set() else "ready"), ""

    def _write_pause_state(self) -> None:
        """Record the pause (or its end) and what it means for the queued tasks' debugoutput; while the store cannot
        be written, try again once a second (its outage is logged once, by self.health)."""
        state, detail = self._pause_state()
        try:
            self.health.call(lambda: self.store.worker_state(self.worker_id, state, detail=detail))
            self.health.call(self.store.note_waiting)
        except SQLAlchemyError as exc:
            if not is_outage(exc):
                raise
            self._next_state_try = time.monotonic() + 1.0
            return
        self._state_unwritten = False

    def _heartbeat_loop(self) -> None:
        """Until the loop has ended (not just been asked to stop: a task finishing in its grace period keeps
        its lease), renew the lease; once a stop is asked, show the worker as stopping (not ready)."""
        every = max(0.5, self.store.lease_seconds / 4)
        marked = False
        while not self._finished.wait(every):
            try:
                if self.stop_event.is_set() and not marked:
                    with self._state_lock:
                        self.health.call(lambda: self.store.worker_state(self.worker_id, "stopping",
                                                                         task_id=self.current_task))
                    marked = True
                self.health.call(lambda: self.store.heartbeat(self.worker_id, self.current_task))
            except SQLAlchemyError as exc:
                if not is_outage(exc):  # an outage is logged once by self.health, not at every beat
                    log.exception("heartbeat failed")

    # --- one task --------------------------------------------------------------------------------

    def process(self, task: Task) -> None:
        started = time.monotonic()
        log.info("task %s accepted by %s", task.id, self.worker_id, extra={"task_id": task.id})
        interrupt = threading.Event()
        self._denoised.clear()
        watcher = threading.Thread(target=self._watch_kill, args=(task.id, interrupt), name="kill-watcher",
                                   daemon=True)
        watcher.start()
        try:
            self._run_task(task, interrupt)
            log.info("task %s done in %.2fs", task.id, time.monotonic() - started, extra={"task_id": task.id})
        except _Killed as killed:
            self.storage.discard_task(task.uuid)
            self._settle(task, self.store.finish_killed, task.id, self.worker_id, killed.note)
            log.info("task %s killed: %s", task.id, killed.note, extra={"task_id": task.id})
        except TaskKilled:  # seen at a store write: the task already says where it was killed
            self.storage.discard_task(task.uuid)
            log.info("task %s killed", task.id, extra={"task_id": task.id})
        except _Stopping:
            self.storage.discard_task(task.uuid)
            self._settle(task, self.store.release, task.id, self.worker_id, "requeued: the worker stopped")
            log.info("task %s put back in the queue: the worker is stopping", task.id, extra={"task_id": task.id})
        except TaskLost as lost:
            log.warning("task %s: %s", task.id, lost, extra={"task_id": task.id})
        except SQLAlchemyError as exc:
            if not is_outage(exc):
                raise
            # The store went away where the task cannot wait for it: back to the queue once the store answers,
            # without counting the attempt (no worker died); if the worker must stop first, its lease requeues it.
            self.storage.discard_task(task.uuid)
            self._settle(task, self.store.release, task.id, self.worker_id, "requeued: the task store was unavailable")
            log.info("task %s put back in the queue: the task store was unavailable", task.id,
                     extra={"task_id": task.id})
        except _Failed as failed:
            self.storage.discard_task(task.uuid)
            self._settle(task, self.store.fail, task.id, str(failed), self.worker_id)
            log.info("task %s failed: %s", task.id, failed, extra={"task_id": task.id})
        except Exception as exc:  # any other error fails this task, never the worker
            log.exception("task %s failed", task.id, extra={"task_id": task.id})
            self.storage.discard_task(task.uuid)
            self._settle(task, self.store.fail, task.id, failure_reason(exc), self.worker_id)
        finally:
            interrupt.set()
            watcher.join(timeout=2)

    def _watch_kill(self, task_id: int, interrupt: threading.Event) -> None:
        """While the task runs: set `interrupt` once it is killed, or once the worker's stop is due while it is
        still denoising (a finished generation is decoded and stored instead, within shutdown_finish_seconds)."""
        while not interrupt.wait(KILL_POLL_SECONDS):
            if stop_due(self.stop_event) and not self._denoised.is_set():
                interrupt.set()
                return
            try:  # not through self.health: a read that works while writes fail (a full disk) is no recovery
                if self.store.kill_requested(task_id):
                    interrupt.set()
            except SQLAlchemyError as exc:
                if not is_outage(exc):  # an outage is logged once, by the task's own store calls
                    log.warning("could not read the kill flag of task %s (%s); retrying", task_id, exc)

    def _settle(self, task: Task, action: Callable[..., object], *args: Any) -> None:
        """Record how the task ended, unless it is no longer this worker's (waiting out a store outage)."""
        try:
            self._through_outage(lambda: action(*args))
        except TaskLost as lost:
            log.warning("task %s: %s", task.id, lost, extra={"task_id": task.id})
        except SQLAlchemyError as exc:
            if not is_outage(exc):
                raise
            log.warning("task %s: how it ended could not be recorded before the worker had to stop; its lease "
                        "requeues it", task.id, extra={"task_id": task.id})

    def _through_outage(self, action: Callable[[], Any], *, finishing: bool = False) -> Any:
        """A store call the task cannot go on without: retried through an outage until the store answers.
        It gives up only when the worker must stop now (a finished video: once the finishing time is over too)."""
        def give_up() -> bool:
            return finish_overdue(self.stop_event, self.settings.shutdown_finish_seconds) if finishing \
                else stop_due(self.stop_event)

        return self.health.retry(action, give_up=give_up, sleep=self._pause)

    def _pause(self, seconds: float) -> None:
        """Wait between tries: cut short by a stop request; once stopping, a plain (short) sleep, not a spin."""
        if self.stop_event.is_set():
            time.sleep(min(seconds, 1.0))
        else:
            self.stop_event.wait(seconds)

    def _step(self, task: Task, status: str, *, finishing: bool = False, **fields: Any) -> None:
        """Move to `status`; then stop here if a kill was asked or the worker is stopping (`finishing`: the
        video is made; a stop no longer interrupts it, it is stored and recorded first)."""
        reclaim = task.attempts if finishing else None  # a made video takes back a task its lease lost
        killed = self._through_outage(
            lambda: self.store.advance(task.id, self.worker_id, status, claimed_attempt=reclaim, **fields),
            finishing=finishing)
        if killed:
            raise _Killed(f"Task killed by request at {status}.")
        if not finishing and stop_due(self.stop_event):
            raise _Stopping()

    def _run_task(self, task: Task, interrupt: threading.Event) -> None:
        parameters = parameters_of(task)
        self._step(task, PREPROCESS_START)
        image = self._load_image(task)
        try:
            params = parse_params(parameters, self.limits)
            params = size_for_image(params, image.size, self.limits)  # a size of 0 is only known now
            params = self.generator.resolve(params, image)
        except InvalidParameter as exc:
            raise _Failed(str(exc)) from None
        used = {**parameters, "seed": str(params.seed), "width": str(params.width), "height": str(params.height)}
        if getattr(params, "mode", None) == "fast":  # the distilled schedule replaced these
            used.update(mode="fast", steps=str(params.steps), scale=str(params.scale), flowShift=str(params.flow_shift))
        self._step(task, PREPROCESS_END, parameters=used,
                   debugoutput=f"input image {image.width}x{image.height}; video {params.width}x{params.height}, "
                               f"{params.num_frames} frames, {params.steps} steps, seed {params.seed}")
        self._step(task, ASSIGN, debugoutput=f"assigned to {self.worker_id} ({self.generator.device})")
        self._step(task, START)

        video = self._generate(task, params, image, interrupt)

        # The video is made: from here a stop does not throw it away (bounded by shutdown_finish_seconds).
        self._step(task, OUTPUT_FULL, finishing=True, debugoutput=f"generated {video.frames.shape[0]} frames "
                                                                  f"{params.width}x{params.height} in "
                                                                  f"{video.timings.get('generate', 0.0):.2f}s")
        self._step(task, END, finishing=True)
        self._step(task, POSTPROCESS_START, finishing=True)
        relpath = self.storage.output_relpath(task.uuid, OUTPUT_NAME)
        size = self._store_output(video.frames, params.fps, relpath, task.id)
        cost = self.settings.cost_per_second * max(0.0, time.time() - task.accepttime)
        outputs = [NewOutput(OUTPUT_NAME, OUTPUT_TYPE, size, relpath)]
        done = f"done: {OUTPUT_NAME} ({size} bytes, {params.num_frames} frames at {params.fps} fps)"
        try:
            self._through_outage(
                lambda: self.store.complete(task.id, self.worker_id, outputs, totalcost=cost, debugoutput=done,
                                            claimed_attempt=task.attempts),
                finishing=True)
        except TaskKilled:
            raise _Killed("Task killed by request at task_postprocess_start.") from None

    def _store_output(self, frames: Any, fps: int, relpath: str, task_id: int) -> int:
        """Encode the MP4 to a local temporary file, then put it in the storage under its final name (atomically:
        never a partial file there); returns its size. Too little free disk space fails the task before writing."""
        scratch = Path(tempfile.gettempdir())
        problem = self.resources_problem()
        if problem:
            raise _Failed(problem)
        with tempfile.TemporaryDirectory(prefix="particalize-output-", dir=scratch) as tmp:
            path = write_mp4(frames, Path(tmp) / OUTPUT_NAME, fps=fps)
            size = path.stat().st_size
            if self.store.kill_requested(task_id):  # killed during the write: nothing reaches the storage
                raise _Killed("Task killed by request while its MP4 was written.")
            try:
                self.storage.put_file(path, relpath)
            except StorageError as exc:
                raise _Failed(str(exc)) from None
        return size

    def _load_image(self, task: Task) -> Image.Image:
        field = "inputImage" if task.upload_id else "inputImageUrl"
        if task.upload_id:
            upload = self._through_outage(lambda: self.store.get_upload(task.upload_id))
            if upload is None:
                raise _Failed(f"Request parameter [{field}]: the uploaded image {task.image_url} no longer exists.")
            data = upload.data
        else:
            url = task.image_url or ""
            try:
                data, content_type = self.fetch(
                    url, max_bytes=self.settings.max_image_bytes, timeout=self.settings.fetch_timeout_seconds,
                    allow_private=self.settings.allow_private_urls,
                )
            except UnsafeUrl as exc:
                raise _Failed(f"Request parameter [{field}] is refused: {exc}") from None
            except FetchError as exc:
                raise _Failed(f"Request parameter [{field}] could not be fetched: {exc}") from None
            media = content_type.split(";")[0].strip().lower()
            if media.startswith(IMAGE_TYPES_REFUSED):
                raise _Failed(f"Request parameter [{field}]: {url} answered {media}, not an image.")
        try:
            return decode_image(data, field=field)
        except InvalidParameter as exc:
            raise _Failed(str(exc)) from None

    def _entered_blocks(self) -> bool:
        """Whether the last run got as far as a transformer block (unknown: assume it did)."""
        points = getattr(self.generator, "interrupt_points", None)
        return points is None or points.blocks_entered > 0

    def _generate(self, task: Task, params: GenerationParams, image: Image.Image, interrupt: threading.Event) -> Any:
        """Run the pipeline; progress goes to debugoutput (at most every progress_interval_seconds, and the
        last step always). A kill, or a stop once its grace period is over, stops it before the next transformer
        block (`interrupt`, set by the kill watcher) or at the end of the step it arrives in, whichever is first."""
        interval = self.settings.progress_interval_seconds
        state: dict[str, Any] = {"written": 0.0}
        denoised = self._denoised

        def progress(p: Any) -> None:
            now = time.monotonic()
            if p.step >= p.total:
                denoised.set()  # from here a stop no longer interrupts the run: the video is finished instead
            if now - state["written"] < interval and p.step != p.total:
                return
            state["written"] = now
            rate = p.step / p.elapsed if p.elapsed > 0 else 0.0
            speed = f"{rate:.2f} it/s" if rate >= 1 else f"{(1 / rate if rate else 0.0):.2f} s/it"
            remaining = (p.total - p.step) / rate if rate else 0.0
            note = (f"step {p.step}/{p.total} ({p.percentage:.0f}%), {speed}, elapsed {p.elapsed:.1f}s, "
                    f"remaining {remaining:.1f}s")
            try:  # progress is not worth waiting for: during a store outage the run goes on without it
                if self.health.call(lambda: self.store.advance(task.id, self.worker_id, OUTPUT, debugoutput=note,
                                                               message=f"step {p.step}/{p.total}")):
                    interrupt.set()
            except TaskKilled:  # stop at this step's end, noting where (below)
                interrupt.set()
            except SQLAlchemyError as exc:
                if not is_outage(exc):
                    raise

        def should_stop() -> bool:  # once per step; a kill reaches `interrupt` by the watcher or the progress write
            if stop_due(self.stop_event) and not denoised.is_set():
                interrupt.set()  # mid-denoise: requeued
            return interrupt.is_set()

        try:
            return self.generator.generate(params, image, progress=progress, should_stop=should_stop,
                                           interrupt=interrupt.is_set)
        except Interrupted as stopped:
            if self.store.kill_requested(task.id):
                if stopped.step >= stopped.total:
                    where = f"after the last step ({stopped.total}); the VAE decode was skipped or cut short"
                elif stopped.step == 0 and not self._entered_blocks():
                    where = "before the first step (while its inputs were encoded)"
                else:
                    where = f"during step {stopped.step + 1} of {stopped.total}"
                raise _Killed(f"Task killed by request {where}.") from None
            raise _Stopping() from None


def _set_cpu_threads(settings: Any) -> None:
    """On CPU, leave one core to the API process (unless told otherwise)."""
    import torch

    from pipeline.devices import pick_device

    if pick_device(settings.device).type != "cpu":
        return
    threads = settings.worker_cpu_threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    log.info("worker uses %d CPU thread(s) for torch", threads)


def run_worker(
    settings: Any,
    stop_event: threading.Event,
    *,
    slot: int = 0,
    generator: Generator | None = None,
    parent_pid: int | None = None,
    report: Report | None = None,
) -> int:
    """Load the model once, then serve tasks until `stop_event` (a server.shutdown.StopRequest gives the
    running task its grace period; a plain Event stops it at once). `report`: the pipe to the serve process that
    started this worker, if one did. Returns the process exit code."""
    from particalize import __version__
    from particalize.compose import make_generator
    from particalize.compose_server import open_storage

    health = StoreHealth(log)  # a worker started during a store outage waits for the store, it does not crash

    def when_up(action: Callable[[], Any]) -> Any:
        return health.retry(action, give_up=stop_event.is_set, sleep=stop_event.wait)

    store = when_up(lambda: open_store(settings))
    worker_id = worker_id_for(settings, slot)
    when_up(lambda: store.register_worker(worker_id, pid=os.getpid(), model=settings.model, device="",
                                          state="loading", version=__version__))
    if generator is None:
        try:
            _set_cpu_threads(settings)
            generator = make_generator(settings)
        except Exception as exc:
            log.error("worker %s cannot load model %s: %s", worker_id, settings.model, exc)
            store.worker_state(worker_id, "failed", detail=str(exc))
            return EXIT_LOAD_FAILED
    loaded = f"loaded in {getattr(generator, 'load_seconds', 0.0):.1f}s"
    loras = getattr(generator, "loras", [])
    if loras:  # what /ready lists: each LoRA, its strength, and whether fast mode is there
        loaded += "; LoRAs: " + "; ".join(info.describe() for info in loras)
    if getattr(generator, "random_weights", False):
        from pipeline.random_weights import NOISE_WARNING

        loaded = f"{NOISE_WARNING}; {loaded}"
        log.warning("worker %s: %s", worker_id, NOISE_WARNING)
    when_up(lambda: store.register_worker(worker_id, pid=os.getpid(), model=settings.model,
                                          device=str(generator.device), state="stopping" if stop_event.is_set()
                                          else "ready", detail=loaded, version=__version__))
    log.info("worker %s ready: model %s on %s", worker_id, settings.model, generator.device)
    worker = Worker(store, open_storage(settings), generator, settings, worker_id=worker_id, report=report)
    try:
        worker.run(stop_event, parent_pid=parent_pid)
    finally:
        try:
            store.worker_state(worker_id, "stopped")
        finally:
            store.db.dispose()
    log.info("worker %s stopped after %d task(s)", worker_id, worker.tasks_done)
    return 0
