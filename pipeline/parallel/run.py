"""What each rank of a context-parallel group does with a request.

Rank 0 holds a `LeaderGenerator`: the warm generator's interface (what the worker or `generate` already call), whose
`generate` first broadcasts the request (the resolved parameters and the image) to the follower ranks over a gloo
control group, then runs its own part. Follower ranks sit in `follow`: receive a request, run the same generate,
drop the output (every rank decodes; only rank 0's video is used). Stops are collective: the ranks reduce their stop
flags once per step (pipeline.parallel.group.agree_stop), so every rank raises Interrupted at the same step; the
per-block check of a single process is not used (a rank leaving mid-step would leave the others in a collective).
After each run the ranks gather how it ended, so an error on any rank ends the run on every rank; a collective that
fails (a rank died, or one did not answer within the group's timeout) means the group is broken: the run fails
saying so and the group must be started again (the caller's `on_broken`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image

from pipeline.errors import Interrupted
from pipeline.generator import ProgressFn, StopFn, Video, VideoGenerator
from pipeline.interrupt import InterruptPoints
from pipeline.lora.stack import LoraInfo
from pipeline.parallel.group import agree_stop
from pipeline.params import GenerationParams, ResolvedParams
from pipeline.resolve import Modes
from pipeline.speed.acceleration import Applied
from pipeline.weight_files.loaded_file import LoadedFile

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(days=365)
"""The control group only carries requests, for which followers wait as long as the worker is idle."""
STOP = ("stop",)


class ParallelGroupBroken(RuntimeError):
    """A collective failed: a rank died or did not answer in time. No more runs on this group."""


RANK_PIDS: list[int] = []
"""Each rank's process id, by rank, as control_group gathered them: how rank 0 tells which rank died."""
DEATH_WAIT_SECONDS = 2.0
"""How long rank 0 looks for a dead rank's process after a collective failed (its peer may be dying still)."""


def control_group() -> Any:
    """A gloo group over the same ranks for requests (called by every rank, in the same order, after joining); every
    rank's process id is gathered over it once (RANK_PIDS)."""
    import os

    group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    pids: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid(), group=group)
    RANK_PIDS[:] = [int(pid) for pid in pids]
    return group


def _process_ended(pid: int) -> bool:
    """The process is gone or a zombie (a dead child its launcher has not reaped yet); False where /proc is not."""
    from pathlib import Path

    stat = Path(f"/proc/{pid}/stat")
    if not Path("/proc/self/stat").exists():
        return False
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def dead_ranks(pids: list[int], wait_seconds: float = DEATH_WAIT_SECONDS) -> list[int]:
    """The ranks whose process has ended, looking for up to `wait_seconds` (none found: [])."""
    import time

    deadline = time.monotonic() + wait_seconds
    while True:
        dead = [rank for rank, pid in enumerate(pids) if _process_ended(pid)]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def broken_group_message(error: BaseException, pids: list[int] | None = None) -> str:
    """What a broken group means, in words for the task's debugerror: which rank, and what to do. The transport's
    own text (gloo's, with its source paths and peer addresses) goes to the log only."""
    log.warning("a collective of the context-parallel group failed: %s", error)
    pids = RANK_PIDS if pids is None else pids
    dead = dead_ranks(pids) if pids else []
    size = f"{len(pids)}-process " if pids else ""
    if dead:
        who = ", ".join(f"rank {r}" for r in dead)
        what = f"{who} of the {size}context-parallel group stopped (its process ended) while this task ran"
    else:
        what = (f"a rank of the {size}context-parallel group stopped answering (its process died, hung or lost its "
                "connection) while this task ran")
    return (f"{what}. The task failed and the worker starts its group again (the worker log has that rank's last "
            "lines): send the task again once /ready answers.")


def _ended(error: BaseException | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, Interrupted):
        return "interrupted"
    return f"{type(error).__name__}: {error}"


def run_request(generator: VideoGenerator, params: GenerationParams, image: Image.Image,
                progress: ProgressFn | None = None, should_stop: StopFn | None = None, tool: str = "",
                loras: Sequence[tuple[Path, float]] = ()) -> Video:
    """This rank's part of one run; raises what ended it on any rank (the same on every rank)."""
    device = generator.device

    def collective_stop() -> bool:
        return agree_stop(should_stop is not None and should_stop(), device)

    error: BaseException | None = None
    video = None
    try:
        video = generator.generate(params, image, progress=progress, should_stop=collective_stop, tool=tool,
                                   loras=loras)
    except Exception as exc:  # noqa: BLE001 - every rank must reach the verdict below
        error = exc
    endings: list[str | None] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(endings, _ended(error))
    except Exception as exc:
        raise ParallelGroupBroken(broken_group_message(exc)) from error or exc
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(endings) if e is not None]
    if failed:
        r, ending = failed[0]
        if ending == "interrupted":
            raise Interrupted(params.steps, params.steps)
        raise RuntimeError(f"rank {r} of the context-parallel group failed: {ending}")
    assert video is not None
    return video


class LeaderGenerator:
    """Rank 0's generator: broadcasts each request to the followers, then runs its own part. What a caller reads of
    the warm model (the worker's Generator protocol) is the inner generator's, named one by one below."""

    def __init__(self, inner: VideoGenerator, control: Any, on_broken: Callable[[], None] | None = None) -> None:
        self.inner = inner
        self.control = control
        self.on_broken = on_broken
        self.broken: str | None = None

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def load_seconds(self) -> float:
        return self.inner.load_seconds

    @property
    def random_weights(self) -> bool:
        return self.inner.random_weights

    @property
    def loras(self) -> list[LoraInfo]:
        return self.inner.loras

    @property
    def loaded_files(self) -> list[LoadedFile]:
        return self.inner.loaded_files

    @property
    def degraded(self) -> list[str]:
        return self.inner.degraded

    @property
    def interrupt_points(self) -> InterruptPoints:
        return self.inner.interrupt_points

    @property
    def modes(self) -> Modes:
        return self.inner.modes

    @property
    def applied(self) -> Applied:
        return self.inner.applied

    def resolve(self, params: GenerationParams, image: Image.Image) -> ResolvedParams:
        return self.inner.resolve(params, image)

    def check_loras(self, files: Sequence[Path]) -> None:
        self.inner.check_loras(files)

    def generate(self, params: GenerationParams, image: Image.Image, progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None, interrupt: Callable[[], bool] | None = None,
                 tool: str = "", loras: Sequence[tuple[Path, float]] = ()) -> Video:
        """As VideoGenerator.generate; `interrupt` is read once per step with `should_stop` (not per block); every
        rank switches to `tool`'s LoRAs, and loads the request's `loras` from the same files (the ranks share one
        machine; the caller holds the files until the run is over)."""
        if self.broken:
            raise ParallelGroupBroken(self.broken)
        if image.mode != "RGB":
            image = image.convert("RGB")
        params = self.inner.resolve(params, image)  # as is when resolved; the seed is fixed, every rank uses it

        # An error in rank 0's own callbacks (a store write) must not leave it alone mid-step: it becomes a stop,
        # agreed at this step's end by every rank, and is raised here once the run has ended everywhere.
        failures: list[Exception] = []

        def report(p: Any) -> None:
            if progress is not None and not failures:
                try:
                    progress(p)
                except Exception as exc:  # noqa: BLE001
                    failures.append(exc)

        def stop() -> bool:
            if not failures:
                try:
                    if (should_stop is not None and should_stop()) or (interrupt is not None and interrupt()):
                        return True
                except Exception as exc:  # noqa: BLE001
                    failures.append(exc)
            return bool(failures)

        try:
            request = ("generate", params, image, tool, tuple(loras)) if loras else ("generate", params, image, tool)
            dist.broadcast_object_list([request], src=0, group=self.control)
            return run_request(self.inner, params, image, progress=report, should_stop=stop, tool=tool, loras=loras)
        except Interrupted:
            if failures:
                raise failures[0] from None
            raise
        except ParallelGroupBroken as exc:
            self._broke(str(exc))
            raise
        except dist.DistError as exc:
            self._broke(broken_group_message(exc))
            raise ParallelGroupBroken(self.broken) from exc

    def render(self, params: GenerationParams, image: Image.Image, out: Any, progress: ProgressFn | None = None,
               should_stop: StopFn | None = None) -> Video:
        import time

        from pipeline.video import write_mp4

        video = self.generate(params, image, progress=progress, should_stop=should_stop)
        started = time.perf_counter()
        write_mp4(video.frames, out, fps=video.params.fps)
        video.timings["encode"] = time.perf_counter() - started
        return video

    def _broke(self, why: str) -> None:
        self.broken = why
        log.error("%s; this group takes no more runs", why)
        if self.on_broken is not None:
            self.on_broken()

    def close(self) -> None:
        """Tell the followers to leave their loop (best effort: a broken group's followers are stopped by the
        launcher)."""
        if self.broken:
            return
        try:
            dist.broadcast_object_list([STOP], src=0, group=self.control)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not tell the follower ranks to stop: %s", exc)


def follow(generator: VideoGenerator, control: Any) -> None:
    """A follower rank: run every request rank 0 broadcasts, until it says stop. Raises ParallelGroupBroken."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        if box[0] == STOP:
            return
        _, params, image, tool, *rest = box[0]
        try:
            run_request(generator, params, image, tool=tool, loras=rest[0] if rest else ())
        except ParallelGroupBroken:
            raise
        except Exception as exc:  # noqa: BLE001 - rank 0 records it; this rank waits for the next request
            log.info("rank %d: the run ended: %s", dist.get_rank(), _ended(exc))
