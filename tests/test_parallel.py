"""Context parallelism (issue 19): one video over 2 gloo processes on the CPU with the tiny model.

Marked `parallel` (`pytest -m parallel`); the server ones are `slow` too. The ranks are real spawned processes
joined in a real process group; the server tests drive a real `particalize serve` whose worker runs 2 ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from benchmarks.harness import ServeProcess
from pipeline.parallel.group import parallel_refusal
from pipeline.params import GenerationParams
from pipeline.video import read_mp4
from server.store.models import TERMINAL
from tests.images import ImageServer
from tests.test_e2e_server import KEY, RUN, SECRET, Server, process_gone, run_body

pytestmark = pytest.mark.parallel

ROOT = Path(__file__).resolve().parents[1]
PARAMS = GenerationParams(width=32, height=32, numFrames=5, steps=4, seed=7, prompt="two ranks, one video")


def start_image() -> Image.Image:
    pixels = np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8)
    return Image.fromarray(pixels)


def _rank(rank: int, init_method: str, out: str, stop_after: int | None, fail_at: int | None) -> None:
    """One rank of a 2-rank group: rank 0 runs the request (stopped after `stop_after` steps, or its progress
    callback failing at step `fail_at`, if given) and saves its frames or its error; each rank writes the last
    step it finished."""
    from pipeline.errors import Interrupted
    from pipeline.generator import GeneratorOptions, VideoGenerator
    from pipeline.parallel.group import ParallelSetup, init_group
    from pipeline.parallel.run import LeaderGenerator, control_group, run_request
    from pipeline.presets import get_preset

    torch.set_num_threads(1)
    init_group(ParallelSetup("ulysses", 2, rank, init_method, timeout_seconds=120), "cpu")
    control = control_group()
    generator = VideoGenerator(GeneratorOptions(get_preset("tiny"), Path(out), speed=_cp_speed()))
    steps: list[int] = []

    def record(p) -> None:
        steps.append(p.step)
        if rank == 0 and p.step == fail_at:
            raise RuntimeError(f"the store refused step {p.step}")

    try:
        if rank == 0:
            leader = LeaderGenerator(generator, control)
            stop = (lambda: len(steps) >= stop_after) if stop_after else None
            video = leader.generate(PARAMS, start_image(), progress=record, should_stop=stop)
            np.save(Path(out) / "frames.npy", video.frames)
        else:
            import torch.distributed as dist

            box = [None]
            dist.broadcast_object_list(box, src=0, group=control)
            _, params, image, tool = box[0]
            run_request(generator, params, image, progress=record, tool=tool)
    except Interrupted:
        pass
    except RuntimeError as exc:
        (Path(out) / f"rank{rank}.error").write_text(str(exc))
    (Path(out) / f"rank{rank}.steps").write_text(str(steps[-1] if steps else 0))
    (Path(out) / f"rank{rank}.mode").write_text(generator.applied.notes[-1] if generator.applied.notes else "")


def _cp_speed():
    from pipeline.speed.acceleration import SpeedOptions

    return SpeedOptions(context_parallel="ulysses")


def run_two_ranks(tmp_path: Path, stop_after: int | None = None, fail_at: int | None = None) -> Path:
    mp.start_processes(_rank, args=(f"file://{tmp_path}/rendezvous", str(tmp_path), stop_after, fail_at), nprocs=2,
                       join=True, start_method="spawn")
    return tmp_path


def test_ulysses_over_two_ranks_gives_the_single_process_video(tmp_path: Path, tiny_generator) -> None:
    out = run_two_ranks(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: float sums of another thread count differ in their last bit
    try:
        single = tiny_generator.generate(PARAMS, start_image()).frames
    finally:
        torch.set_num_threads(threads)
    parallel = np.load(out / "frames.npy")
    assert parallel.shape == single.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(parallel, single)
    assert (out / "rank0.steps").read_text() == (out / "rank1.steps").read_text() == "4"


def test_a_stop_on_rank_0_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    out = run_two_ranks(tmp_path, stop_after=2)
    assert not (out / "frames.npy").exists(), "the stopped run made no video"
    assert (out / "rank0.steps").read_text() == (out / "rank1.steps").read_text() == "2"


def test_an_error_on_rank_0_mid_run_ends_the_run_on_every_rank(tmp_path: Path) -> None:
    out = run_two_ranks(tmp_path, fail_at=1)
    assert (out / "rank0.error").read_text() == "the store refused step 1"
    assert not (out / "rank1.error").exists() and not (out / "frames.npy").exists()
    assert (out / "rank0.steps").read_text() == (out / "rank1.steps").read_text() == "1"


def test_a_broken_group_is_told_in_words_naming_the_rank_whose_process_ended() -> None:
    from pipeline.parallel.run import broken_group_message, dead_ranks

    ended = subprocess.Popen(["true"])
    ended.wait()
    pids = [os.getpid(), ended.pid]
    assert dead_ranks(pids) == [1]
    raw = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")
    said = broken_group_message(raw, pids)
    assert said.startswith("rank 1 of the 2-process context-parallel group stopped (its process ended)"), said
    assert "gloo" not in said and "127.0.0.1" not in said and "send the task again once /ready answers" in said
    unknown = broken_group_message(raw, [os.getpid(), os.getpid()])
    assert "a rank of the 2-process context-parallel group stopped answering" in unknown, unknown


def test_only_combinations_that_can_run_are_accepted() -> None:
    assert parallel_refusal("ulysses", 2, 40, "cuda", 2, "auto") is None
    assert parallel_refusal("ulysses", 2, 2, "cpu", 0, "auto") is None
    assert "does not divide the model's 40 attention heads" in parallel_refusal("ulysses", 3, 40, "cuda", 8, "auto")
    assert "needs 4 GPUs" in parallel_refusal("ulysses", 4, 40, "cuda", 2, "auto")
    assert "2 or more processes" in parallel_refusal("ulysses", 1, 40, "cuda", 1, "auto")
    assert "log-sum-exp" in parallel_refusal("ring", 2, 40, "cuda", 2, "native")
    assert "log-sum-exp" in parallel_refusal("ring", 2, 2, "cpu", 0, "auto")
    assert parallel_refusal("ring", 2, 40, "cuda", 2, "_native_cudnn") is None
    assert "does not run under context parallelism" in parallel_refusal("ulysses", 2, 40, "cuda", 2, "_flash_3")


def particalize(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PARTICALIZE_")}
    return subprocess.run([sys.executable, "-m", "particalize.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**clean, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.parametrize(("flags", "says"), [
    (["--context-parallel", "ulysses", "--parallel-degree", "3"], "does not divide the model's 2 attention heads"),
    (["--context-parallel", "ring", "--parallel-degree", "2"], "ring attention needs an attention backend"),
    (["--context-parallel", "ulysses"], "2 or more processes"),
    (["--parallel-degree", "2"], "set --context-parallel ulysses"),
])
def test_generate_refuses_an_impossible_combination_before_loading(tmp_path: Path, flags: list[str], says: str):
    start_image().save(tmp_path / "in.png")
    done = particalize("generate", "--model", "tiny", "--image", str(tmp_path / "in.png"), "--out",
                       str(tmp_path / "out.mp4"), *flags)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_generate_over_two_ranks_writes_the_single_process_mp4(tmp_path: Path) -> None:
    start_image().save(tmp_path / "in.png")
    video = ["--model", "tiny", "--image", str(tmp_path / "in.png"), "--width", "32", "--height", "32",
             "--num-frames", "5", "--steps", "2", "--seed", "3"]
    one = particalize("generate", *video, "--out", str(tmp_path / "one.mp4"))
    two = particalize("generate", *video, "--out", str(tmp_path / "two.mp4"), "--context-parallel", "ulysses",
                      "--parallel-degree", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert '"seed": 3' in two.stdout
    assert (tmp_path / "one.mp4").read_bytes() == (tmp_path / "two.mp4").read_bytes()


# ---- the server: `serve --model tiny` whose worker runs 2 ranks ------------------------------------------------

CP_ENV = {"PARTICALIZE_CONTEXT_PARALLEL": "ulysses", "PARTICALIZE_PARALLEL_DEGREE": "2",
          "PARTICALIZE_PARALLEL_TIMEOUT_SECONDS": "30", "PARTICALIZE_WORKER_CPU_THREADS": "1"}


def test_a_worker_refuses_an_impossible_degree_with_the_code_that_is_not_restarted(tmp_path: Path) -> None:
    from server.processes.exit_codes import EXIT_LOAD_FAILED

    done = particalize("worker", "--model", "tiny", "--data-dir", str(tmp_path / "data"),
                       env={**CP_ENV, "PARTICALIZE_PARALLEL_DEGREE": "4"})
    assert done.returncode == EXIT_LOAD_FAILED, done.stderr
    assert "--parallel-degree 4 does not divide the model's 2 attention heads" in done.stderr


@pytest.mark.slow
def test_serve_refuses_an_impossible_degree_at_start(tmp_path: Path) -> None:
    started = time.monotonic()
    done = particalize("serve", "--model", "tiny", "--port", "0", "--data-dir", str(tmp_path / "data"),
                       env={**CP_ENV, "PARTICALIZE_PARALLEL_DEGREE": "3"}, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "does not divide the model's 2 attention heads" in done.stdout
    assert time.monotonic() - started < 60, "refused at start, not after a restart loop"


class CpServer(Server):
    """`particalize serve --model tiny` with one worker over 2 ranks."""

    def __init__(self, data_dir: Path) -> None:
        ServeProcess.__init__(self, data_dir, env=dict(
            PARTICALIZE_API_KEYS=f"{KEY}:{SECRET}", PARTICALIZE_ALLOW_PRIVATE_URLS="1", PARTICALIZE_NODE_NAME="cp",
            PARTICALIZE_PROGRESS_INTERVAL_SECONDS="0", PARTICALIZE_ACCESS_LOG="0", **CP_ENV))

    def rank_pids(self, after: int = 0) -> list[int]:
        """The pids of the worker's ranks, from its launcher's log line (the `after`-th group started)."""
        lines = [line for line in self.log_text().splitlines() if "ranks started" in line]
        assert len(lines) > after, self.log_text()
        return [int(pid) for pid in lines[after].split("pids ")[1].rstrip(")").split(", ")]


@pytest.fixture(scope="module")
def cp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CpServer]:
    srv = CpServer(tmp_path_factory.mktemp("serve-cp") / "data")
    try:
        srv.wait_ready(timeout=180)
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_serve_with_degree_2_runs_a_task_to_its_mp4(cp_server: CpServer, images: ImageServer) -> None:
    run = cp_server.post(RUN, run_body(images.url, steps=3, numFrames=5)).json()
    task = cp_server.wait_status(run["taskid"], TERMINAL, timeout=120)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "0", task
    (out,) = task["outputs"]
    path = cp_server.data_dir / "cp.mp4"
    path.write_bytes(httpx.get(out["url"], timeout=30).content)
    assert read_mp4(path)[1].shape == (5, 32, 32, 3)
    assert len(cp_server.rank_pids()) == 2


@pytest.mark.slow
def test_a_kill_mid_run_stops_every_rank_and_the_group_takes_the_next_task(cp_server: CpServer,
                                                                           images: ImageServer) -> None:
    worker = cp_server.wait_ready()
    long = cp_server.post(RUN, run_body(images.url, steps=100)).json()
    cp_server.wait_status(long["taskid"], ("task_output",), timeout=120)
    assert cp_server.post("/v1/Task/Kill", {"taskid": long["taskid"]}).json()["result"] is True
    deadline = time.monotonic() + 30
    killed = cp_server.detail(taskid=long["taskid"])
    while "during step" not in killed["debugoutput"] and time.monotonic() < deadline:
        time.sleep(0.05)
        killed = cp_server.detail(taskid=long["taskid"])
    assert killed["status"] == "task_cancel" and killed["outputs"] == [] and "during step" in killed["debugoutput"]
    after = cp_server.post(RUN, run_body(images.url, steps=2, numFrames=5)).json()
    assert cp_server.wait_status(after["taskid"], TERMINAL, timeout=60)["pexit"] == "0"
    assert cp_server.wait_ready()["pid"] == worker["pid"], "the same group: no rank was left behind in the kill"


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_ends_the_task_and_the_group_restarts(cp_server: CpServer,
                                                                         images: ImageServer) -> None:
    worker = cp_server.wait_ready()
    groups = sum("ranks started" in line for line in cp_server.log_text().splitlines())
    leader, follower = cp_server.rank_pids(groups - 1)
    long = cp_server.post(RUN, run_body(images.url, steps=100)).json()
    cp_server.wait_status(long["taskid"], ("task_output",), timeout=120)
    os.kill(follower, signal.SIGKILL)
    ended = cp_server.wait_status(long["taskid"], TERMINAL, timeout=90)
    assert ended["status"] == "task_postprocess_end" and ended["pexit"] != "0", ended
    said = ended["debugerror"]
    assert "rank 1 of the 2-process context-parallel group stopped" in said and "send the task again" in said, said
    assert "gloo" not in said.lower() and ".cc" not in said and ".cpp" not in said, "in words, not the transport's"
    assert process_gone(leader, timeout=30), "rank 0 of the broken group exited"
    restarted = cp_server.wait_ready(not_pid=worker["pid"], timeout=180)
    assert restarted["pid"] != worker["pid"]
    after = cp_server.post(RUN, run_body(images.url, steps=2, numFrames=5)).json()
    assert cp_server.wait_status(after["taskid"], TERMINAL, timeout=120)["pexit"] == "0"
