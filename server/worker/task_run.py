"""One claimed task, walked through Wiro's lifecycle and recorded as it ended (server/worker/outcomes.py).

task_accept (claimed) -> preprocess_start (fetch and check the image, and the request's LoRAs) -> preprocess_end ->
assign -> start -> output (the current step, repeated) -> output_full -> end -> postprocess_start (encode the MP4,
store it) -> postprocess_end (pexit 0 and the output).

Task/Kill ends the task in task_cancel at once (server/store); the run notices within one transformer block (a
watcher thread turns the store's flag into an event the pipeline checks before every block and every VAE encoder
and decoder call), throws the run away and leaves no output behind, also when the kill comes during the VAE
decode or the MP4 write. A graceful stop past its grace period interrupts the run at its next step (it goes back
to the queue), unless denoising has finished: the video is then decoded, stored and recorded (bounded by
shutdown_finish_seconds). A store call the run cannot go on without is retried through an outage.

After the last denoising step every store call rides out an outage (a stopping worker: until its finishing time
is over): the video is put in the storage once, after the store confirms the task is still this worker's at
task_postprocess_start, and recorded when the store answers; it is never sent back to the queue. A run deletes
stored files only of a task the store confirms is still its own and not done (server/worker/outcomes.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from pipeline.errors import Interrupted, InvalidParameter, LoraMismatch
from pipeline.images import decode_image
from pipeline.params import GenerationParams, ResolvedParams
from pipeline.resolve import Modes, resolve_request
from pipeline.video import write_mp4
from server.netguard import FetchError, UnsafeUrl
from server.processes.shutdown import finish_overdue, stop_due
from server.storage import OUTPUT_NAME, OUTPUT_TYPE, Storage, StorageError
from server.store import NewOutput, Store, TaskKilled, TaskLost
from server.store.models import (
    ASSIGN,
    END,
    OUTPUT_FULL,
    POSTPROCESS_START,
    PREPROCESS_END,
    PREPROCESS_START,
    START,
    Task,
)
from server.store.outage import StoreHealth, is_outage
from server.task_record import ImageSource, record_of
from server.tool_info import DEFAULT_SLUG
from server.worker.options import WorkerOptions
from server.worker.outcomes import HANDLING, Ending, Outcome, TaskEnd, ending_of
from server.worker.request_loras import ready_loras
from server.worker.scratch import output_folder

if TYPE_CHECKING:
    from pipeline.generator import Video
    from pipeline.interrupt import InterruptPoints
    from pipeline.lora.stack import LoraInfo
    from pipeline.weight_files.loaded_file import LoadedFile

log = logging.getLogger("particalize.worker")

KILL_POLL_SECONDS = 0.1
"""How often the kill watcher looks at the run (its end, a stop that is due) and, without wake-ups, reads the task's
kill flag (bounds kill-to-stop with the time of one transformer block)."""

IMAGE_TYPES_REFUSED = ("text/", "application/json", "application/xml", "application/javascript")

Fetch = Callable[..., tuple[bytes, str]]


class Generator(Protocol):
    """Everything the worker and its start-up report read of the warm model (pipeline.generator.VideoGenerator, or
    pipeline.parallel.run.LeaderGenerator for a context-parallel group); nothing else is asked of it."""

    @property
    def device(self) -> Any: ...
    @property
    def load_seconds(self) -> float: ...
    @property
    def random_weights(self) -> bool:
        """Real-size model with random values: every video is noise."""
    @property
    def loras(self) -> list[LoraInfo]: ...
    @property
    def loaded_files(self) -> list[LoadedFile]:
        """The single weight files the model came from (format, memory)."""
    @property
    def degraded(self) -> list[str]:
        """What runs other than configured (speed option fallbacks, interrupt points not installed)."""
    @property
    def interrupt_points(self) -> InterruptPoints:
        """Where a run can be stopped (the worker says where a kill stopped it)."""
    @property
    def modes(self) -> Modes:
        """The modes it runs: what a request's parameters are resolved with."""

    def generate(self, params: ResolvedParams, image: Image.Image, progress: Any = None,
                 should_stop: Any = None, interrupt: Any = None, tool: str = "",
                 loras: tuple[tuple[Path, float], ...] = ()) -> Video:
        """`tool`: the catalogue tool whose LoRAs run ("": the default tool's); passed only for another tool.
        `loras`: the request's LoRA files on top of them, for this run only; passed only when there are any."""

    def check_loras(self, files: list[Path]) -> None:
        """LoraMismatch unless each file is a LoRA for this base (asked only of a task with request LoRAs)."""


class TaskRun:
    def __init__(
        self,
        task: Task,
        *,
        store: Store,
        storage: Storage,
        generator: Generator,
        options: WorkerOptions,
        worker_id: str,
        health: StoreHealth,
        stop_event: threading.Event,
        fetch: Fetch,
        space_problem: Callable[[], str | None],
        kill_read_seconds: Callable[[], float] = lambda: KILL_POLL_SECONDS,
    ) -> None:
        self.task = task
        self.store, self.storage, self.generator = store, storage, generator
        self.options, self.worker_id, self.health = options, worker_id, health
        self.stop_event, self.fetch, self.space_problem = stop_event, fetch, space_problem
        self.interrupt = threading.Event()
        """Set to stop the pipeline before its next transformer block (a kill, or a stop that is due)."""
        self.denoised = threading.Event()
        """Set once the last denoising step is done (the video is then finished, not requeued)."""
        self.kill_seen = threading.Event()
        """A kill was seen (by the watcher or a progress write): no need to ask the store again."""
        self.kill_hint = threading.Event()
        """Set by a wake-up (server/wakeup.py): the task may have been killed; the watcher reads the flag now."""
        self.kill_read_seconds = kill_read_seconds
        """How often the watcher reads the kill flag without a hint (0.1 s when polling, seconds with wake-ups)."""

    def execute(self) -> Outcome:
        """Run the task and record how it ended; the outcome. Raises only a store error that is not an outage."""
        started = time.monotonic()
        log.info("task %s accepted by %s", self.task.id, self.worker_id, extra={"task_id": self.task.id})
        watcher = threading.Thread(target=self._watch_kill, name="kill-watcher", daemon=True)
        watcher.start()
        try:
            self._run()
            ending = Ending(Outcome.DONE)
        except Exception as exc:  # any error ends this task, never the worker
            ending = ending_of(exc)
        finally:
            self.interrupt.set()  # the watcher ends at its next wake-up; nothing waits for it
            self.kill_hint.set()
        self._end(ending, time.monotonic() - started)
        return ending.outcome

    # --- the steps -------------------------------------------------------------------------------

    def _run(self) -> None:
        task, limits = self.task, self.options.limits
        self._step(PREPROCESS_START)
        record = record_of(task)
        image = self._load_image(record.image)
        try:  # resolved once: at Run when the image came with it, else now that it is here
            params = record.resolved or resolve_request(record.params, image.size, limits, self.generator.modes)
        except InvalidParameter as exc:
            raise TaskEnd(Outcome.BAD_INPUT, str(exc)) from None
        with ExitStack() as held:  # the request's LoRA files stay in the cache until the run is over
            loras = ready_loras(record.loras, self.options.request_loras,
                                lambda files: self.generator.check_loras(files), held)
            self._step(PREPROCESS_END, resolved=params,
                       debugoutput=f"input image {image.width}x{image.height}; video {params.width}x"
                                   f"{params.height}, {params.num_frames} frames, {params.steps} steps, seed "
                                   f"{params.seed}{loras.describe()}")
            self._step(ASSIGN, debugoutput=f"assigned to {self.worker_id} ({self.generator.device})")
            self._step(START)
            video = self._generate(params, image, "" if record.tool == DEFAULT_SLUG else record.tool, loras.files)
        try:
            self._finish(video, params, loras.describe())
        except SQLAlchemyError as exc:
            if not is_outage(exc):
                raise
            raise TaskEnd(Outcome.UNRECORDED) from exc

    def _finish(self, video: Video, params: GenerationParams, lora_note: str = "") -> None:
        """The video is made: store and record it. From here a stop does not throw it away (bounded by
        shutdown_finish_seconds), and every store call waits out an outage. `lora_note`: ends the last debugoutput
        (the request LoRAs used)."""
        task = self.task
        schedule = video.schedule  # cached mode: the steps MagCache computed and skipped
        self._step(OUTPUT_FULL, finishing=True, debugoutput=f"generated {video.frames.shape[0]} frames "
                                                            f"{params.width}x{params.height} in "
                                                            f"{video.timings.get('generate', 0.0):.2f}s",
                   recorded=schedule.record() if schedule is not None else None)
        self._step(END, finishing=True)
        self._step(POSTPROCESS_START, finishing=True)
        relpath = self.storage.output_relpath(task.uuid, OUTPUT_NAME)
        size = self._store_output(video.frames, params.fps, relpath)
        cost = self.options.cost_per_second * max(0.0, time.time() - task.accepttime)
        outputs = [NewOutput(OUTPUT_NAME, OUTPUT_TYPE, size, relpath)]
        done = f"done: {OUTPUT_NAME} ({size} bytes, {params.num_frames} frames at {params.fps} fps)" + "".join(
            f"; {note}" for note in video.notes) + lora_note  # e.g. the decode was retried with VAE tiling
        try:
            self._through_outage(
                lambda: self.store.tasks.complete(task.id, self.worker_id, outputs, totalcost=cost, debugoutput=done,
                                                  claimed_attempt=task.attempts),
                finishing=True)
        except TaskKilled:
            raise TaskEnd(Outcome.KILLED, "Task killed by request at task_postprocess_start.") from None

    def _step(self, status: str, *, finishing: bool = False, **fields: Any) -> None:
        """Move to `status`; then stop here if a kill was asked or the worker is stopping (`finishing`: the
        video is made; a stop no longer interrupts it, it is stored and recorded first)."""
        reclaim = self.task.attempts if finishing else None  # a made video takes back a task its lease lost
        killed = self._through_outage(
            lambda: self.store.tasks.advance(self.task.id, self.worker_id, status, claimed_attempt=reclaim, **fields),
            finishing=finishing)
        if killed:
            raise TaskEnd(Outcome.KILLED, f"Task killed by request at {status}.")
        if not finishing and stop_due(self.stop_event):
            raise TaskEnd(Outcome.STOPPED)

    def _load_image(self, source: ImageSource) -> Image.Image:
        field = source.field
        if source.upload_id:
            upload_id = source.upload_id
            upload = self._through_outage(lambda: self.store.uploads.get(upload_id))
            if upload is None:
                raise TaskEnd(Outcome.BAD_INPUT,
                              f"Request parameter [{field}]: the uploaded image {source.url} no longer exists.")
            data = upload.data
        else:
            fetch = self.options.fetch
            try:
                data, content_type = self.fetch(source.url, max_bytes=fetch.max_image_bytes,
                                                timeout=fetch.timeout_seconds, allow_private=fetch.allow_private_urls)
            except UnsafeUrl as exc:
                raise TaskEnd(Outcome.BAD_INPUT, f"Request parameter [{field}] is refused: {exc}") from None
            except FetchError as exc:
                raise TaskEnd(Outcome.BAD_INPUT, f"Request parameter [{field}] could not be fetched: {exc}") from None
            media = content_type.split(";")[0].strip().lower()
            if media.startswith(IMAGE_TYPES_REFUSED):
                raise TaskEnd(Outcome.BAD_INPUT, f"Request parameter [{field}]: {source.url} answered {media}, not "
                                                 "an image.")
        try:
            return decode_image(data, field=field)
        except InvalidParameter as exc:
            raise TaskEnd(Outcome.BAD_INPUT, str(exc)) from None

    def _generate(self, params: ResolvedParams, image: Image.Image, tool: str = "",
                  loras: tuple[tuple[Path, float], ...] = ()) -> Video:
        """Run the pipeline; progress is recorded (at most every progress_interval_seconds, and the last step
        always). A kill, or a stop once its grace period is over, stops it before the next transformer block
        (`interrupt`, set by the kill watcher) or at the end of the step it arrives in, whichever is first."""
        task, interval = self.task, self.options.progress_interval_seconds
        written = [0.0]

        def progress(p: Any) -> None:
            now = time.monotonic()
            if p.step >= p.total:
                self.denoised.set()  # from here a stop no longer interrupts the run: the video is finished instead
            if now - written[0] < interval and p.step != p.total:
                return
            written[0] = now
            try:  # progress is not worth waiting for: during a store outage the run goes on without it
                if self.health.call(lambda: self.store.tasks.progress(task.id, self.worker_id, p.step, p.total,
                                                                      p.elapsed)):
                    self._killed()
            except TaskKilled:  # stop at this step's end, noting where (below)
                self._killed()
            except SQLAlchemyError as exc:
                if not is_outage(exc):
                    raise

        def should_stop() -> bool:  # once per step; a kill reaches `interrupt` by the watcher or the progress write
            if stop_due(self.stop_event) and not self.denoised.is_set():
                self.interrupt.set()  # mid-denoise: requeued
            return self.interrupt.is_set()

        which: dict[str, Any] = {"tool": tool} if tool else {}  # a run without them is called as before they existed
        if loras:
            which["loras"] = loras
        try:
            return self.generator.generate(params, image, progress=progress, should_stop=should_stop,
                                           interrupt=self.interrupt.is_set, **which)
        except LoraMismatch as exc:  # a tool not loaded here (the catalogue changed since Run), a request LoRA
            raise TaskEnd(Outcome.BAD_INPUT, str(exc)) from None
        except Interrupted as stopped:
            if self.kill_seen.is_set() or self._through_outage(lambda: self.store.tasks.kill_requested(task.id),
                                                               finishing=self.denoised.is_set()):
                raise TaskEnd(Outcome.KILLED, f"Task killed by request {self._where(stopped)}.") from None
            raise TaskEnd(Outcome.STOPPED) from None

    def _where(self, stopped: Interrupted) -> str:
        if stopped.step >= stopped.total:
            return f"after the last step ({stopped.total}); the VAE decode was skipped or cut short"
        points = self.generator.interrupt_points
        if not points.blocks_hooked:
            if stopped.step == 0:  # only the VAE encoder's check stops a run before its first step ends
                return "before the first step (while its inputs were encoded)"
            return (f"at the end of step {stopped.step} of {stopped.total} (per-step interrupt: the per-block hook "
                    "could not be installed)")
        if stopped.step == 0 and points.blocks_entered == 0:
            return "before the first step (while its inputs were encoded)"
        return f"during step {stopped.step + 1} of {stopped.total}"

    def _store_output(self, frames: Any, fps: int, relpath: str) -> int:
        """Encode the MP4 to a local temporary file, then put it in the storage under its final name (atomically:
        never a partial file there); returns its size. Too little free disk space fails the task before writing."""
        problem = self.space_problem()
        if problem:
            raise TaskEnd(Outcome.DISK_FULL, problem)
        with output_folder() as tmp:
            path = write_mp4(frames, tmp / OUTPUT_NAME, fps=fps)
            size = path.stat().st_size
            self._confirm_before_storing()
            try:
                self.storage.put_file(path, relpath)
            except StorageError as exc:
                raise TaskEnd(Outcome.STORAGE_FAILED, str(exc)) from None
        return size

    def _confirm_before_storing(self) -> None:
        """Ask the store (waiting out an outage) that the task is still this worker's at task_postprocess_start,
        renewing its lease, before the MP4 goes in the storage under the task's output name: a task killed
        during the write gets nothing stored, and one another worker has taken further (or recorded) is not
        written over (TaskLost)."""
        reached = POSTPROCESS_START
        try:
            killed = self._through_outage(
                lambda: self.store.tasks.advance(self.task.id, self.worker_id, reached,
                                                 claimed_attempt=self.task.attempts),
                finishing=True)
        except TaskKilled:
            killed = True
        if killed:
            raise TaskEnd(Outcome.KILLED, "Task killed by request while its MP4 was written.")

    # --- the kill watcher ------------------------------------------------------------------------

    def _killed(self) -> None:
        self.kill_seen.set()
        self.interrupt.set()

    def _watch_kill(self) -> None:
        """While the task runs: set `interrupt` once it is killed, or once the worker's stop is due while it is
        still denoising (a finished generation is decoded and stored instead, within shutdown_finish_seconds).
        The kill flag is read when a wake-up hints at a kill, and every `kill_read_seconds()` regardless."""
        next_read = time.monotonic() + self.kill_read_seconds()
        while not self.interrupt.is_set():
            hinted = self.kill_hint.wait(KILL_POLL_SECONDS)
            if self.interrupt.is_set():
                return
            if stop_due(self.stop_event) and not self.denoised.is_set():
                self.interrupt.set()
                return
            if not hinted and time.monotonic() < next_read:
                continue
            self.kill_hint.clear()
            next_read = time.monotonic() + self.kill_read_seconds()
            try:  # not through self.health: a read that works while writes fail (a full disk) is no recovery
                if self.store.tasks.kill_requested(self.task.id):
                    self._killed()
            except SQLAlchemyError as exc:
                next_read = time.monotonic() + KILL_POLL_SECONDS  # a hint must not be lost to a failed read
                if not is_outage(exc):  # an outage is logged once, by the task's own store calls
                    log.warning("could not read the kill flag of task %s (%s); retrying", self.task.id, exc)

    # --- the end ---------------------------------------------------------------------------------

    def _end(self, ending: Ending, seconds: float) -> None:
        """Apply the outcome's row of the table: record the end, discard the output (only once the store has
        confirmed the task was this worker's: see Handling.discard), log it."""
        handling, task_id = HANDLING[ending.outcome], self.task.id
        confirmed = True  # an outcome without a record is itself the store's answer (see Handling.discard)
        if handling.record is not None:
            record = handling.record
            confirmed = self._settle(lambda: record(self.store.tasks, task_id, self.worker_id, ending.note))
        if handling.discard and confirmed:
            self.storage.discard_task(self.task.uuid)
        log.log(handling.level, handling.log.format(task=task_id, note=ending.note, seconds=seconds),
                exc_info=ending.error, extra={"task_id": task_id})

    def _settle(self, action: Callable[[], object]) -> bool:
        """Record how the task ended, unless it is no longer this worker's (waiting out a store outage). True
        when the store took it: the task was still this worker's."""
        try:
            self._through_outage(action)
        except TaskLost as lost:
            log.warning("task %s: %s", self.task.id, lost, extra={"task_id": self.task.id})
            return False
        except SQLAlchemyError as exc:
            if not is_outage(exc):
                raise
            log.warning("task %s: how it ended could not be recorded before the worker had to stop; its lease "
                        "requeues it", self.task.id, extra={"task_id": self.task.id})
            return False
        return True

    def _through_outage(self, action: Callable[[], Any], *, finishing: bool = False) -> Any:
        """A store call the task cannot go on without: retried through an outage until the store answers.
        It gives up only when the worker must stop now (a finished video: once the finishing time is over too)."""
        def give_up() -> bool:
            return finish_overdue(self.stop_event, self.options.shutdown_finish_seconds) if finishing \
                else stop_due(self.stop_event)

        return self.health.retry(action, give_up=give_up, sleep=self._pause)

    def _pause(self, seconds: float) -> None:
        """Wait between tries: cut short by a stop request; once stopping, a plain (short) sleep, not a spin."""
        if self.stop_event.is_set():
            time.sleep(min(seconds, 1.0))
        else:
            self.stop_event.wait(seconds)
