"""What does our wrapper cost? `VideoGenerator.generate` against the bare diffusers pipeline, same inputs.

The wrapper adds parameter resolution, a lock, the per-shift scheduler lookup, a per-step callback (progress and
cooperative stop), whatever it precomputes (cached prompt embeddings) and a float32 view of the frames.

Three ways to make the same video, timed in a rotating order so that drift of the machine cancels:

- direct:  `generator.pipe(...)` with exactly the arguments the wrapper passed (recorded from one call of the
           wrapper, callback removed): the wrapper's overhead against this is judged against the 3% target;
- plain:   `generator.pipe(prompt=..., negative_prompt=..., ...)`, the call a plain diffusers user writes; only run
           when the wrapper passes something else (embeddings), since otherwise it is the same call as direct;
- wrapper: `generator.generate(...)` with a progress callback that records a timestamp and a never-true stop check.

It also reports seconds per denoising step, model load, MP4 encode, peak memory, and whether the frames of all
paths are identical. The generator is built as the server builds it, so PARTICALIZE_* settings (attention
backend, compile, step cache, memory mode ...) apply to every path alike.

    python -m benchmarks.bench_generate --model tiny
    python -m benchmarks.bench_generate --model wan2.1-i2v-14b-480p --lora particalize.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.memory import max_rss_bytes, peak_bytes, reset_peak
from benchmarks.timing import synchronize, timed
from pipeline.generator import StepProgress, VideoGenerator
from pipeline.params import GenerationParams, Limits, parse_params
from pipeline.presets import ModelPreset, get_preset
from pipeline.video import write_mp4

TARGET_OVERHEAD_PCT = 3.0
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Tiny: 5 timed rounds after 1 warm-up (the first plan) are too few, measured on a 2-core VM. One video is ~47 ms,
# a single run wanders by 2-4% (median absolute deviation), and the first ~10 runs are up to 60% slower while the
# allocator and caches settle. 200 rounds after 5 warm-up rounds keep the 95% interval of the overhead within
# about +-1.2% (100 rounds: +-2%, past the 3% target now and then) in ~35 s. More frames or pixels do not help:
# the noise grows with them. README.md, "Noise".
TINY_DEFAULTS: dict[str, Any] = dict(
    width=32, height=32, num_frames=9, steps=4, scale=5.0, flow_shift=5.0, repeats=200, warmup=5
)
# The hosted tool's defaults (480P budget, 81 frames, 30 steps, scale 5, flowShift 5); one run is minutes, so
# one round and no warm-up round: `prime` takes the first-call costs off the first timed path instead.
REAL_DEFAULTS: dict[str, Any] = dict(
    width=832, height=480, num_frames=81, steps=30, scale=5.0, flow_shift=5.0, repeats=1, warmup=0
)
MAX_ENCODE_SAMPLES = 20
OWN_COST_SAMPLES = 200
CALLBACK_KWARGS = ("callback_on_step_end", "callback_on_step_end_tensor_inputs")


@dataclass
class Run:
    """One timed call: wall seconds, and for wrapper runs the per-step split the progress callback saw."""

    seconds: float
    step_seconds: list[float] = field(default_factory=list)
    first_step_end: float | None = None
    """Start of the call to the end of step 1: everything before the loop (prompt embeddings unless cached, CLIP
    image encoder, VAE encode of the conditioning frames) and step 1 itself."""
    after_last_step: float | None = None
    """End of the last step to the return: VAE decode and conversion to frames."""
    peak_cuda_bytes: int | None = None


@dataclass
class RecordedCall:
    """The wrapper's call of the pipeline, to replay without the wrapper."""

    kwargs: dict[str, Any]
    scheduler: Any
    seed: int
    generator_device: str

    def fresh_kwargs(self) -> dict[str, Any]:
        """The same arguments with a new generator in the same state (a used generator has moved on)."""
        kwargs = {k: v for k, v in self.kwargs.items() if k not in CALLBACK_KWARGS}
        kwargs["generator"] = torch.Generator(device=self.generator_device).manual_seed(self.seed)
        return kwargs

    def plain_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        """What a plain diffusers user passes: the prompt text instead of any precomputed embeddings."""
        kwargs = {k: v for k, v in self.fresh_kwargs().items() if k not in ("prompt_embeds", "negative_prompt_embeds")}
        return kwargs | {"prompt": params.prompt, "negative_prompt": params.negative_prompt}

    @property
    def passes_prompt_text(self) -> bool:
        return "prompt" in self.kwargs and "prompt_embeds" not in self.kwargs


class _Recorded(Exception):
    """Raised instead of running the pipeline: recording needs the arguments only, not a whole video."""


class _StandIn:
    """Stands in for `generator.pipe` during `generate`: forwards every attribute, replaces the call."""

    def __init__(self, pipe: Any) -> None:
        object.__setattr__(self, "_pipe", pipe)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._pipe, name, value)


class _RecordingPipe(_StandIn):
    """Records the wrapper's call and stops there."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        object.__setattr__(self, "calls", [])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("the wrapper called the pipeline with positional arguments; record them too")
        self.calls.append((kwargs, self._pipe.scheduler))
        raise _Recorded


class _NoWorkPipe(_StandIn):
    """Does no model work: calls the step callback once per step and returns ready frames."""

    def __init__(self, pipe: Any, frames: np.ndarray) -> None:
        super().__init__(pipe)
        object.__setattr__(self, "_output", SimpleNamespace(frames=[frames]))

    def __call__(self, **kwargs: Any) -> Any:
        callback = kwargs.get("callback_on_step_end")
        for i in range(kwargs["num_inference_steps"]):
            if callback is not None:
                callback(self, i, None, {})
        return self._output


def record_call(gen: VideoGenerator, params: GenerationParams, image: Image.Image) -> RecordedCall:
    """Let the wrapper prepare one call and capture it; this also fills whatever cache the wrapper keeps."""
    pipe = gen.pipe
    recorder = _RecordingPipe(pipe)
    gen.pipe = recorder  # type: ignore[assignment]
    try:
        gen.generate(params, image)
    except _Recorded:
        pass
    finally:
        gen.pipe = pipe
    if len(recorder.calls) != 1:
        raise RuntimeError(f"expected the wrapper to call the pipeline once, it called it {len(recorder.calls)} times")
    kwargs, scheduler = recorder.calls[0]
    generator = kwargs.get("generator")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"expected one torch.Generator from the wrapper, got {type(generator).__name__}")
    return RecordedCall(kwargs, scheduler, generator.initial_seed(), str(generator.device))


def settle_gc() -> None:
    """Collect, then freeze what survives (the model, diffusers, torch: ~400k objects) out of the collector.

    Every run starts with `gc.collect()` so that no path inherits another's garbage; unfrozen, that costs
    ~0.1 s per run on the tiny preset (twice the run itself), and collections inside a run would scan the
    same long-lived objects. Frozen, both are microseconds, for every path alike.
    """
    gc.collect()
    gc.freeze()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def test_image(width: int, height: int) -> Image.Image:
    """A deterministic picture (gradients and a disc) of the video's size, so no input file is needed."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(width, height) / 3) ** 2
    rgb = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), disc.astype(np.float32)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def _call_pipe(gen: VideoGenerator, scheduler: Any, kwargs: dict[str, Any]) -> tuple[Run, np.ndarray]:
    """The bare pipeline (its progress bar is already disabled by the generator), timed alone."""
    gen.pipe.scheduler = scheduler
    gc.collect()
    reset_peak(gen.device)
    seconds, result = timed(lambda: gen.pipe(**kwargs), gen.device)
    return Run(seconds, peak_cuda_bytes=peak_bytes(gen.device)), np.asarray(result.frames[0], dtype=np.float32)


def run_wrapper(gen: VideoGenerator, params: GenerationParams, image: Image.Image) -> tuple[Run, np.ndarray]:
    """`generate` with a progress callback that only records a timestamp and a stop check that never stops.

    On CUDA the step ends are CUDA events recorded on the stream (no synchronization inside the run), so they
    measure the GPU's step time, not how far ahead the host has queued.
    """
    cuda = gen.device.type == "cuda"
    stamps: list[float] = []
    events: list[torch.cuda.Event] = []

    def progress(_: StepProgress) -> None:
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            events.append(event)
        else:
            stamps.append(time.perf_counter())

    def never_stop() -> bool:
        return False

    gc.collect()
    reset_peak(gen.device)
    synchronize(gen.device)
    start_event = end_event = None
    if cuda:
        start_event = torch.cuda.Event(enable_timing=True)
        start_event.record()
    started = time.perf_counter()
    video = gen.generate(params, image, progress=progress, should_stop=never_stop)
    if cuda:
        end_event = torch.cuda.Event(enable_timing=True)
        end_event.record()
    synchronize(gen.device)
    seconds = time.perf_counter() - started

    if cuda:
        assert start_event is not None and end_event is not None
        marks = [0.0] + [start_event.elapsed_time(e) / 1000 for e in events]
        marks.append(start_event.elapsed_time(end_event) / 1000)
    else:
        marks = [0.0] + [s - started for s in stamps] + [seconds]
    run = Run(seconds, peak_cuda_bytes=peak_bytes(gen.device))
    if len(marks) > 2:
        run.first_step_end = marks[1]
        run.step_seconds = [b - a for a, b in zip(marks[1:-2], marks[2:-1], strict=True)]
        run.after_last_step = marks[-1] - marks[-2]
    return run, video.frames


@dataclass
class Measurement:
    timed: dict[str, list[Run]]
    warmup: dict[str, list[Run]]
    order: list[str]
    max_abs_diff: dict[str, float]
    """Largest frame difference of each path against the first direct run."""
    frames: np.ndarray


def measure(
    gen: VideoGenerator,
    params: GenerationParams,
    image: Image.Image,
    call: RecordedCall,
    repeats: int,
    warmup: int,
) -> Measurement:
    """Warm-up rounds, then timed rounds; each round runs every path once, the order rotating by one per round.

    With two paths that is ABBA (direct first, then wrapper first ...), with three every path takes every
    position equally often over three rounds: a machine getting faster or slower hits all paths alike.
    """
    runners: dict[str, Callable[[], tuple[Run, np.ndarray]]] = {
        "direct": lambda: _call_pipe(gen, call.scheduler, call.fresh_kwargs()),
        "wrapper": lambda: run_wrapper(gen, params, image),
    }
    if not call.passes_prompt_text:
        runners["plain"] = lambda: _call_pipe(gen, call.scheduler, call.plain_kwargs(params))
    names = list(runners)
    timed: dict[str, list[Run]] = {n: [] for n in names}
    warm: dict[str, list[Run]] = {n: [] for n in names}
    diffs = {n: 0.0 for n in names}
    order: list[str] = []
    reference: np.ndarray | None = None
    for i in range(warmup + repeats):
        if i in (0, warmup):
            settle_gc()
        samples = warm if i < warmup else timed
        shift = i % len(names)
        round_order = names[shift:] + names[:shift]
        for name in round_order:
            run, frames = runners[name]()
            samples[name].append(run)
            if i >= warmup:
                order.append(name)
            if reference is None:
                reference = frames
            elif frames.shape != reference.shape:
                diffs[name] = float("inf")
            else:
                diffs[name] = max(diffs[name], float(np.max(np.abs(frames - reference))))
        label = f"warm-up round {i + 1}" if i < warmup else f"timed round {i - warmup + 1}"
        print(f"  {label}: " + "  ".join(f"{n} {samples[n][-1].seconds:.4f}s" for n in round_order), flush=True)
    assert reference is not None
    return Measurement(timed, warm, order, diffs, reference)


def wrapper_own_seconds(
    gen: VideoGenerator, params: GenerationParams, image: Image.Image, frames: np.ndarray, repeats: int
) -> list[float]:
    """`generate` around a pipeline that does no work: what the wrapper itself costs per video, free of the
    model's run-to-run noise (which on a small CPU is larger than the whole wrapper). Misses only the few
    microseconds per step diffusers spends handing the callback its arguments."""
    pipe = gen.pipe
    gen.pipe = _NoWorkPipe(pipe, frames)  # type: ignore[assignment]
    seconds: list[float] = []
    stamps: list[float] = []

    def progress(_: StepProgress) -> None:
        stamps.append(time.perf_counter())  # as run_wrapper's callback does on CPU

    def never_stop() -> bool:
        return False

    try:
        for _ in range(repeats):
            stamps.clear()
            started = time.perf_counter()
            gen.generate(params, image, progress=progress, should_stop=never_stop)
            seconds.append(time.perf_counter() - started)
    finally:
        gen.pipe = pipe
    return seconds


def prime(gen: VideoGenerator, call: RecordedCall) -> float:
    """One short untimed call at the same size (2 steps): lazy CUDA/cuBLAS set-up and kernel selection would
    otherwise land on whichever path runs first, which with one round and no warm-up is always `direct`."""
    started = time.perf_counter()
    steps = min(2, call.kwargs["num_inference_steps"])
    _call_pipe(gen, call.scheduler, call.fresh_kwargs() | {"num_inference_steps": steps})
    return time.perf_counter() - started


def time_encode(frames: np.ndarray, fps: int, repeats: int) -> tuple[list[float], int]:
    """MP4 encode of the generated frames (what `render` adds after `generate`): seconds per encode, file size."""
    seconds: list[float] = []
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.mp4"
        for _ in range(min(max(1, repeats), MAX_ENCODE_SAMPLES)):
            started = time.perf_counter()
            write_mp4(frames, out, fps=fps)
            seconds.append(time.perf_counter() - started)
            size = out.stat().st_size
    return seconds, size


def overhead_stats(base: Sequence[float], wrapper: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Median overhead, the median of per-round overheads, a bootstrap 95% interval and the run-to-run noise."""
    med_b, med_w = statistics.median(base), statistics.median(wrapper)
    pairs = list(zip(base, wrapper, strict=True))
    out: dict[str, Any] = {
        "base_median_s": med_b,
        "wrapper_median_s": med_w,
        "overhead_pct": 100.0 * (med_w / med_b - 1.0),
        "overhead_ms": 1000.0 * (med_w - med_b),
        "paired_overhead_pct": 100.0 * statistics.median(w / b - 1.0 for b, w in pairs),
        "noise_pct": None,
        "ci95_pct": None,
    }
    if len(pairs) >= 3:
        # Median absolute deviation of single runs, relative: how far one run wanders from the typical one.
        out["noise_pct"] = 100.0 * statistics.median(abs(b - med_b) for b in base) / med_b
        rng = np.random.default_rng(seed)
        b, w = np.asarray(base), np.asarray(wrapper)
        picks = rng.integers(0, len(b), size=(2000, len(b)))  # resample whole rounds: keeps the pairing
        ratios = np.median(w[picks], axis=1) / np.median(b[picks], axis=1) - 1.0
        low, high = np.percentile(ratios, [2.5, 97.5]) * 100.0
        out["ci95_pct"] = [float(low), float(high)]
    out["pass"] = out["overhead_pct"] <= TARGET_OVERHEAD_PCT
    out["conclusive"] = out["ci95_pct"] is not None and out["ci95_pct"][1] <= TARGET_OVERHEAD_PCT
    return out


def _summary(values: Sequence[float]) -> dict[str, float | int] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _overhead_line(label: str, ov: dict[str, Any]) -> str:
    ci = ov["ci95_pct"]
    ci_text = f"95% CI {ci[0]:+.2f}..{ci[1]:+.2f}%" if ci else "no interval below 3 rounds"
    noise = f"{ov['noise_pct']:.2f}%" if ov["noise_pct"] is not None else "n/a"
    return (
        f"{label:34}{ov['overhead_pct']:+.2f}% ({ov['overhead_ms']:+.2f} ms/video; paired "
        f"{ov['paired_overhead_pct']:+.2f}%; {ci_text}; single-run noise {noise})"
    )


def render_table(result: dict[str, Any]) -> str:
    """The plain-text table printed at the end (and pasted into README.md)."""
    inp, env, t = result["inputs"], result["environment"], result["timings"]
    lora = inp["lora"] or "none"
    lines = [
        f"particalize generate benchmark, {result['date']}: {inp['model']} on {env['device']} "
        f"({env['device_name']}), nproc {env['nproc']}, {env['torch_threads']} torch threads, "
        f"torch {env['torch']}, diffusers {env['diffusers']}",
        f"inputs: {inp['width']}x{inp['height']} (WxH), {inp['num_frames']} frames, {inp['steps']} steps, "
        f"scale {inp['scale']}, flowShift {inp['flow_shift']}, seed {inp['seed']}, LoRA {lora}"
        f"{' (fused)' if inp['fuse_lora'] else ''}",
        f"{inp['repeats']} timed rounds after {inp['warmup']} warm-up rounds, order rotating per round; "
        f"wrapper passes {'prompt text' if inp['wrapper_passes_prompt_text'] else 'prompt embeddings'}",
        "",
        f"{'':34}{'median':>10}{'min':>10}{'max':>10}{'n':>6}",
    ]
    rows = [
        ("direct pipe call (s/video)", t["direct_s"]),
        ("plain diffusers call (s/video)", t.get("plain_s")),
        ("wrapper generate (s/video)", t["wrapper_s"]),
        ("denoising step (s/step)", t["step_s"]),
        ("start to end of step 1 (s)", t["first_step_end_s"]),
        ("last step to return (s)", t["after_last_step_s"]),
        ("MP4 encode (s)", t["encode_s"]),
        ("model load (s)", [result["load_seconds"]]),
    ]
    for label, values in rows:
        if values is None:
            continue
        s = _summary(values)
        if s is None:
            lines.append(f"{label:34}{'n/a':>10}")
        else:
            lines.append(f"{label:34}{s['median']:>10.4f}{s['min']:>10.4f}{s['max']:>10.4f}{s['n']:>6}")
    mem = result["memory"]
    if mem["cuda_peak_bytes"]:
        peaks = ", ".join(f"{n} {_mib(v)}" for n, v in mem["cuda_peak_bytes"].items())
        lines.append(f"{'peak CUDA memory allocated':34}{peaks}")
    lines.append(
        f"{'peak process RSS (ru_maxrss)':34}{_mib(mem['max_rss_bytes'])} "
        f"(after load {_mib(mem['rss_after_load_bytes'])})"
    )
    diffs = result["frames"]["max_abs_diff_vs_first_direct"]
    same = all(v == 0.0 for v in diffs.values())
    lines.append(
        f"{'frames max |x - first direct run|':34}"
        + ", ".join(f"{n} {v:.3g}" for n, v in diffs.items())
        + (" (identical)" if same else " (DIFFERENT)")
    )
    own = result["wrapper_own"]
    lines.append(
        f"{'wrapper own work (no-work pipe)':34}{1000 * own['median_s']:.3f} ms/video = "
        f"{own['pct_of_direct']:.2f}% of direct (median of {len(t['wrapper_own_s'])})"
    )
    ov = result["overhead"]
    lines.append(_overhead_line("wrapper vs direct (medians)", ov))
    if result.get("net_vs_plain"):
        lines.append(_overhead_line("wrapper vs plain diffusers", result["net_vs_plain"]))
    status = "PASS" if ov["pass"] else "FAIL"
    if ov["conclusive"]:
        note = ""
    elif ov["ci95_pct"] is None:
        note = " (from fewer than 3 rounds: no interval, one slow run decides; add --repeats)"
    else:
        note = " (inconclusive: the 95% interval reaches past the target; add --repeats)"
    lines.append(f"{'overhead target <= ' + format(TARGET_OVERHEAD_PCT, 'g') + '%':34}{status}{note}")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.removeprefix("local:")).name).strip("-") or "model"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_generate",
        description="Wrapper overhead, step time, load, encode and memory of one model preset.",
    )
    p.add_argument("--model", default="tiny", help="tiny, wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p or a directory")
    p.add_argument("--weights-dir", type=Path, help="default: PARTICALIZE_WEIGHTS_DIR, as the server")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="default: PARTICALIZE_DEVICE or auto")
    p.add_argument("--repeats", type=int, help="timed rounds (each runs every path once)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (allocator, kernels, caches)")
    p.add_argument("--out", type=Path, help="JSON result; default benchmarks/results/generate-<model>.json")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--num-frames", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--scale", type=float)
    p.add_argument("--flow-shift", type=float)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora", type=Path, help="LoRA .safetensors to load, as the server would")
    p.add_argument("--lora-strength", type=float)
    p.add_argument("--fuse-lora", action="store_const", const=True, help="fuse the LoRA into the weights")
    p.add_argument("--threads", type=int, help="torch CPU threads; default 1 for tiny on CPU, else torch's (README)")
    p.add_argument("--random-weights", action="store_const", const=True,
                   help="build the real-size model with random weights (no download; frames are noise)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="default: the server's (on with CUDA); --no-compile for the eager path")
    return p


def resolve_args(args: argparse.Namespace, preset: ModelPreset) -> dict[str, Any]:
    """Flags given win; the rest come from the tiny or the hosted defaults."""
    defaults = TINY_DEFAULTS if preset.is_tiny else REAL_DEFAULTS
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}


def build_generator(args: argparse.Namespace) -> VideoGenerator:
    """As the server builds it: PARTICALIZE_* settings first, the flags given on top."""
    from particalize.compose import make_generator
    from particalize.settings import Settings

    settings = Settings().with_overrides(
        model=args.model,
        weights_dir=args.weights_dir,
        device=args.device,
        lora_path=args.lora,
        lora_strength=args.lora_strength,
        fuse_lora=args.fuse_lora,
        random_weights=args.random_weights,
        compile=args.compile,
    )
    return make_generator(settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = get_preset(args.model)
    cfg = resolve_args(args, preset)
    if cfg["repeats"] < 1 or cfg["warmup"] < 0:
        raise SystemExit("--repeats must be at least 1 and --warmup at least 0")
    inputs = {k: cfg[k] for k in ("width", "height", "num_frames", "steps", "scale", "flow_shift")}
    params = parse_params(inputs | {"seed": args.seed}, Limits())  # fail on bad flags before loading 14B weights

    threads = args.threads
    on_cpu = args.device == "cpu" or (args.device in (None, "auto") and not torch.cuda.is_available())
    if threads is None and preset.is_tiny and on_cpu:
        threads = 1  # see README "Noise": 2 threads on this VM flip into a 40x slower mode now and then
    if threads is not None:
        torch.set_num_threads(threads)

    print(f"loading {preset.name} ...", flush=True)
    gen = build_generator(args)
    rss_after_load = max_rss_bytes()
    image = test_image(params.width, params.height)
    params = gen.resolve(params, image)  # width, height and seed are explicit: resolving changes nothing
    call = record_call(gen, params, image)
    prime_s = prime(gen, call)

    print(f"running {cfg['warmup']} warm-up + {cfg['repeats']} timed rounds ...", flush=True)
    m = measure(gen, params, image, call, cfg["repeats"], cfg["warmup"])
    encode_s, mp4_bytes = time_encode(m.frames, params.fps, cfg["repeats"])
    own_s = wrapper_own_seconds(gen, params, image, m.frames, OWN_COST_SAMPLES)

    device = gen.device
    seconds = {name: [r.seconds for r in runs] for name, runs in m.timed.items()}
    wrapper_runs = m.timed["wrapper"]
    timings: dict[str, Any] = {f"{name}_s": values for name, values in seconds.items()}
    timings |= {
        "step_s": [s for r in wrapper_runs for s in r.step_seconds],
        "step_s_per_run": [r.step_seconds for r in wrapper_runs],
        "first_step_end_s": [r.first_step_end for r in wrapper_runs if r.first_step_end is not None],
        "after_last_step_s": [r.after_last_step for r in wrapper_runs if r.after_last_step is not None],
        "encode_s": encode_s,
        "wrapper_own_s": own_s,
    }
    timings |= {f"warmup_{name}_s": [r.seconds for r in runs] for name, runs in m.warmup.items()}
    lora = getattr(gen, "lora", None)
    result: dict[str, Any] = {
        "benchmark": "generate",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.bench_generate", *(argv if argv is not None else sys.argv[1:])]),
        "environment": {
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
            "cpu_model": cpu_model(),
            "nproc": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "platform": platform.platform(),
            "applied": _jsonable(getattr(gen, "applied", None)),
        },
        "inputs": {
            "model": preset.name,
            **{k: getattr(params, k) for k in ("width", "height", "num_frames", "steps", "scale", "flow_shift")},
            "seed": params.seed,
            "fps": params.fps,
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "max_sequence_length": gen.max_sequence_length,
            "scheduler": type(call.scheduler).__name__,
            "wrapper_call_arguments": sorted(call.kwargs),
            "wrapper_passes_prompt_text": call.passes_prompt_text,
            "lora": str(lora.path) if lora else None,
            "lora_strength": lora.strength if lora else None,
            "fuse_lora": bool(lora and lora.fused),
            "repeats": cfg["repeats"],
            "warmup": cfg["warmup"],
            "order": m.order,
        },
        "load_seconds": gen.load_seconds,
        "prime_seconds": prime_s,
        "timings": timings,
        "medians": {k: statistics.median(v) for k, v in timings.items() if v and isinstance(v[0], float)},
        "target_overhead_pct": TARGET_OVERHEAD_PCT,
        "overhead": overhead_stats(seconds["direct"], seconds["wrapper"]),
        "wrapper_own": {
            "median_s": statistics.median(own_s),
            "pct_of_direct": 100.0 * statistics.median(own_s) / statistics.median(seconds["direct"]),
        },
        "net_vs_plain": overhead_stats(seconds["plain"], seconds["wrapper"]) if "plain" in seconds else None,
        "memory": {
            "cuda_peak_bytes": {n: max(r.peak_cuda_bytes or 0 for r in runs) for n, runs in m.timed.items()}
            if device.type == "cuda"
            else None,
            "max_rss_bytes": max_rss_bytes(),
            "rss_after_load_bytes": rss_after_load,
        },
        "frames": {"shape": list(m.frames.shape), "max_abs_diff_vs_first_direct": m.max_abs_diff},
        "mp4_bytes": mp4_bytes,
    }

    out = args.out or RESULTS_DIR / f"generate-{_slug(preset.name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(render_table(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
