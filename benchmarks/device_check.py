"""One GPU run that takes every figure issue 11 asks for, on the real-size model built with random weights.

    python -m benchmarks.device_check                 # real size (Wan2.1 I2V 14B, 480P, 81 frames); one GPU, ~4-5 min
    python -m benchmarks.device_check --small         # the tiny preset at 48x32: a CPU check that every part runs
    python -m benchmarks.device_check --lora fast.safetensors   # fast mode with a real step-distilled LoRA file

What it measures, in this order (each part is skipped, with the reason, when the time budget would be passed
or the part cannot run here; one failing part is recorded and the rest still run):

 1. build: the pipeline with random weights (pipeline.random_weights), parameter counts, GPU memory after it.
 2. eager step: the pre-issue-11 default (SDPA, eager): seconds per denoising step with CFG, first step (with
    encoding), VAE decode + postprocess after the last step, peak GPU memory.
 3. attention kernels alone at this video's self-attention shape (benchmarks.bench_attention), and one eager
    transformer forward with FlashAttention-4 when it is installed and supported.
 4. compile: regional compile (compile_repeated_blocks, dynamic shapes) with auto attention: first forward
    (compilation), then the forward; the compile cache saved (pipeline.speed.compile_cache).
 5. warm restart: dynamo reset, an empty inductor cache directory, the saved cache loaded, then the server's
    warm-up run: "model loaded to ready" with a warm cache. (In-process: some in-memory state survives, so a
    real restart may take a little longer.)
 6. default step: the new default on CUDA (compiled, auto attention): seconds per step, a 30-step video
    estimate, peak GPU memory; then one compiled forward under torch.profiler (top 15 kernels by time, printed
    and in the JSON): what to cut next in the non-attention half.
 7. fast mode as the server runs it: a speed LoRA (random, rank 64 on every attention/FFN Linear of every
    block, built on the device in the serving dtype; or --lora FILE) loaded through LoraStack as an unfused
    adapter, optionally over a random "Particalize" LoRA fused into the weights (--fused-lora-rank), then a
    mode="fast" request through VideoGenerator.generate: the step-distill scheduler, 4 steps, guidance scale 1
    (one forward per step), a new prompt (text encoder included), VAE decode included: seconds per video. One
    forward first compiles the adapter graph (what the server's warm-up does), and is reported apart.
 7b. cached mode (MagCache, issue 28) with the published Wan2.1-I2V-480P calibration (LightX2V's, shipped in
    pipeline/speed/calibrations), as the server runs it: the hooks on the warm model, compiled beneath them when the
    model is compiled (first run reported apart), then a 30-step mode="cached" video with CFG through
    VideoGenerator.generate (encoders and VAE decode included): seconds per video, per computed and per skipped
    step, the steps computed (recorded by the hooks, and planned from the ratios for 30 and 40 steps). The hooks
    are removed afterwards (and the blocks compiled as before), so the parts after it measure the normal mode.
 8. VAE decode of the whole video alone, float32 (as served) and bfloat16.
 9. text encoder on the CPU: GPU memory freed by moving it.
10. float8 (torchao, dynamic activations) + compile: first forward (compile), then the forward.
11. one prompt (and the negative) encoded on the CPU: what a new prompt costs with the text encoder kept there
    (last: it runs only when the budget has time left).
12. context parallelism (Ulysses) over N GPUs: seconds a step against N (benchmarks/parallel_steps.py); skipped,
    with the reason, with fewer than 2 GPUs (--small: 2 gloo processes on the CPU, a check that it runs).

Writes benchmarks/results/device-check-<cuda|cpu-small>.json and prints one table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.bench_attention import measure as measure_attention
from benchmarks.flops import step_flops
from benchmarks.memory import peak_gib, reset_peak
from benchmarks.timing import synchronize, timed
from pipeline.fast import CACHED, FAST
from pipeline.generator import GeneratorOptions, StepProgress, VideoGenerator
from pipeline.lora.stack import LoraInfo
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.speed.acceleration import (
    Applied,
    SpeedOptions,
    apply_compile,
    apply_float8,
    apply_step_cache,
    choose_attention,
    remove_step_cache,
    uncompile,
)
from pipeline.speed.compile_cache import CompileCache, cache_key
from pipeline.speed.step_cache_mag import MagCalibration, MagSettings, planned_schedule, ranges, shipped_calibration

PROMPT = "a dog is crystallizing, fracturing, and disintegrating into sharp, translucent shards"
BLOCK_LINEAR = ("attn1.", "attn2.", "ffn.")
"""Where a Wan LoRA (e.g. lightx2v's rank-64 step-distill one) puts its pairs: every Linear of these, every block."""


def random_lora(transformer: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA in diffusers keys with random values on every attention/FFN Linear of every block, built directly
    on the transformer's device in its dtype (no file: a real-size one is ~0.7 GB at rank 64). Its timing is a
    real LoRA's; its outputs are noise."""
    param = next(transformer.parameters())
    gen = torch.Generator(device=param.device).manual_seed(seed)
    state_dict = {}
    for fqn, module in transformer.named_modules():
        _, _, rest = fqn.partition("blocks.")
        if not isinstance(module, torch.nn.Linear) or not rest.split(".", 1)[-1].startswith(BLOCK_LINEAR):
            continue
        a = torch.randn(rank, module.in_features, generator=gen, device=param.device, dtype=param.dtype)
        b = torch.randn(module.out_features, rank, generator=gen, device=param.device, dtype=param.dtype)
        state_dict[f"transformer.{fqn}.lora_A.weight"] = a / module.in_features**0.5
        state_dict[f"transformer.{fqn}.lora_B.weight"] = b * 1e-3
    return state_dict


class Check:
    """Runs the parts within a time budget and collects their rows and details."""

    def __init__(self, budget_s: float, device: torch.device, skip: set[str]) -> None:
        self.started = time.perf_counter()
        self.skip = skip
        self.budget_s = budget_s
        self.device = device
        self.rows: list[dict[str, Any]] = []
        self.parts: dict[str, Any] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def row(self, what: str, value: float | None, unit: str, note: str = "") -> None:
        self.rows.append({"what": what, "value": value, "unit": unit, "note": note})
        print(f"[{self.elapsed():6.1f} s] {what}: {value} {unit} {note}", flush=True)  # a run cut short still shows

    def part(self, name: str, estimate_s: float, fn: Callable[[], Any]) -> None:
        if name in self.skip:
            self.parts[name] = {"skipped": "--skip"}
            return
        left = self.budget_s - self.elapsed()
        if estimate_s > left:
            self.parts[name] = {"skipped": f"time budget: needs ~{estimate_s:.0f}s, {left:.0f}s left"}
            self.row(name, None, "", self.parts[name]["skipped"])
            return
        started = time.perf_counter()
        try:
            result = fn()
            self.parts[name] = {"seconds": time.perf_counter() - started, **(result or {})}
        except Exception as exc:  # record and go on: one part failing must not hide the others
            self.parts[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            self.row(name, None, "", f"ERROR {type(exc).__name__}: {str(exc)[:150]}")


def _versions() -> dict[str, str | None]:
    found = {}
    for name in ("torch", "diffusers", "transformers", "torchao", "flash-attn-4", "nvidia-cutlass-dsl"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _run_steps(gen: VideoGenerator, params: GenerationParams, image: Image.Image) -> dict[str, Any]:
    """One video with a timestamp per step: (per-step seconds from step 2 on, first step, last step to return)."""
    stamps: list[float] = []

    def progress(p: StepProgress) -> None:
        synchronize(gen.device)
        stamps.append(time.perf_counter())

    reset_peak(gen.device, release_cache=True)
    synchronize(gen.device)
    started = time.perf_counter()
    video = gen.generate(params, image, progress=progress)
    synchronize(gen.device)
    ended = time.perf_counter()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    schedule = video.schedule
    if schedule is not None:  # cached mode: the steps' own times, computed and skipped apart (step 1 on)
        computed = set(schedule.computed.get("cond", ()))
        per_step = {i: b - a for i, (a, b) in enumerate(zip(stamps, stamps[1:], strict=False), start=1)}
        done = [s for i, s in per_step.items() if i in computed]
        skipped = [s for i, s in per_step.items() if i not in computed]
        return {"video_s": ended - started, "first_step_s": stamps[0] - started,
                "last_step_to_return_s": ended - stamps[-1], "peak_gib": peak_gib(gen.device),
                "frames_shape": list(video.frames.shape), "schedule": schedule.record(),
                "computed_per_pass": {k: len(v) for k, v in schedule.computed.items()},
                "computed_step_s": float(np.median(done)) if done else None,
                "skipped_step_s": float(np.median(skipped)) if skipped else None}
    return {
        "video_s": ended - started,
        "step_s": float(np.median(steps)) if steps else None,
        "first_step_s": stamps[0] - started,
        "last_step_to_return_s": ended - stamps[-1],
        "peak_gib": peak_gib(gen.device),
        "frames_shape": list(video.frames.shape),
    }


class Inputs:
    """The transformer's real inputs, captured from its first call in a run (for timing forwards alone)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.args: tuple | None = None
        self.kwargs: dict | None = None
        self._handle = transformer.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.args is None:
            self.args, self.kwargs = args, dict(kwargs)
            self._handle.remove()


def _forward(gen: VideoGenerator, inputs: Inputs) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return gen.pipe.transformer(*inputs.args, **inputs.kwargs)

    return call


@dataclass
class Run:
    """What the parts share: the options, the request they time, and what earlier parts leave for later ones."""

    args: argparse.Namespace
    check: Check
    params: GenerationParams
    image: Image.Image
    tmp: Path
    device_name: str
    flops: float | None
    """FLOPs of one transformer forward at the real size (None on --small: a rate there means nothing)."""
    gen: VideoGenerator | None = None
    inputs: Inputs | None = None
    cache: CompileCache | None = None
    speed: SpeedOptions = field(default_factory=lambda: SpeedOptions(attention_backend="auto", compile=True))
    """The new default on CUDA, as the compile and float8 parts apply it."""

    @property
    def small(self) -> bool:
        return bool(self.args.small)

    @property
    def device(self) -> torch.device:
        return self.check.device

    @property
    def generator(self) -> VideoGenerator:
        assert self.gen is not None, "the build part runs first"
        return self.gen

    @property
    def captured(self) -> bool:
        """Whether the transformer's inputs were captured (the parts that time a forward alone need them)."""
        return self.inputs is not None and self.inputs.kwargs is not None

    def forward(self) -> Callable[[], Any]:
        assert self.inputs is not None
        return _forward(self.generator, self.inputs)

    def tflops(self, seconds: float) -> str:
        return f"{self.flops / seconds / 1e12:.0f} TFLOP/s" if self.flops else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the tiny preset at 48x32, 9 frames: runs on a CPU")
    p.add_argument("--model", default="wan2.1-i2v-14b-480p", help="a real preset (built with random weights)")
    p.add_argument("--lora", type=Path, help="the speed LoRA for fast mode from a file (e.g. a 4-step distilled "
                   "one) instead of a random rank-64 one built on the device")
    p.add_argument("--speed-lora-rank", type=int, default=64, help="rank of the random speed LoRA")
    p.add_argument("--fused-lora-rank", type=int, default=0, help="also fuse a random 'Particalize' LoRA of this "
                   "rank before loading the speed LoRA, as the server does (0: none; fused, it costs no time a step)")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip parts that would pass this many seconds")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: eager_step, attention, compile, "
                   "warm_restart, default_step, profile, fast_mode, cached_mode, vae_decode, text_encoder_cpu, float8, "
                   "text_encoder_cpu_encode")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> Run:
    """The device, the request (the seed's 480P video, or the tiny preset's 48x32 on --small) and its image."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    size = {"width": 48, "height": 32, "numFrames": 9} if args.small else {"width": 832, "height": 480, "numFrames": 81}
    params = GenerationParams(**size, steps=3, scale=5.0, flowShift=5.0, seed=1, prompt=PROMPT)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (params.height, params.width, 3), np.uint8))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or ''}"
    flops = None if args.small else step_flops(params.height, params.width, params.num_frames).per_forward
    return Run(args, Check(args.budget_s, device, {s for s in args.skip.split(",") if s}), params, image,
               Path(tempfile.mkdtemp(prefix="device-check-")), name, flops)


# 1. build ---------------------------------------------------------------------------------------------------------
def build(run: Run) -> dict[str, Any]:
    from pipeline.random_weights import parameter_counts

    device, check = run.device, run.check
    reset_peak(device, release_cache=True)
    started = time.perf_counter()
    gen = VideoGenerator(GeneratorOptions(get_preset("tiny" if run.small else run.args.model), run.tmp / "weights",
                                          device=device.type, random_weights=not run.small,
                                          speed=SpeedOptions(attention_backend="native", compile=False)))
    synchronize(device)
    seconds = time.perf_counter() - started
    run.gen = gen
    counts = {k: v / 1e9 for k, v in parameter_counts(gen.pipe).items()}
    shown = ", ".join(f"{k} {v:.2f} B" if v >= 0.01 else f"{k} {v * 1e3:.2f} M" for k, v in counts.items())
    memory = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    check.row("build (random weights, on the device)" if not run.small else "build (tiny preset)", seconds, "s",
              shown)
    if memory is not None:
        check.row("GPU memory after build", memory, "GiB")
    return {"parameters_billion": counts, "memory_after_build_gib": memory}


# 2. eager step (the default before issue 11) ------------------------------------------------------------------------
def eager_step(run: Run) -> dict[str, Any]:
    r = _run_steps(run.generator, run.params, run.image)
    run.check.row("step, eager SDPA (old default), CFG", r["step_s"], "s/step", "steps 2..N")
    run.check.row("first step incl. encoders", r["first_step_s"], "s")
    run.check.row("VAE decode + postprocess after last step", r["last_step_to_return_s"], "s")
    run.check.row("peak GPU memory, eager default", r["peak_gib"], "GiB")
    return r


def capture_inputs(run: Run) -> None:
    """When the eager step was skipped: one short run to capture the transformer's inputs."""
    if not run.captured:
        run.generator.generate(run.params.model_copy(update={"steps": 1}), run.image)


# 3. attention kernels ---------------------------------------------------------------------------------------------
def attention(run: Run) -> dict[str, Any]:
    gen, device, check = run.generator, run.device, run.check
    assert run.inputs is not None and run.inputs.kwargs is not None
    config = gen.pipe.transformer.config
    latents = run.inputs.kwargs.get("hidden_states", run.inputs.args[0] if run.inputs.args else None)
    patch = config.patch_size
    tokens = (latents.shape[2] // patch[0]) * (latents.shape[3] // patch[1]) * (latents.shape[4] // patch[2])
    dtype = next(gen.pipe.transformer.parameters()).dtype
    rows = measure_attention(1, config.num_attention_heads, tokens, config.attention_head_dim, dtype, device,
                             repeats=5 if run.small else 10)
    for r in rows:
        if "ms" in r:
            check.row(f"attention {r['kernel']}", r["ms"], "ms/call",
                      f"{r['tflops']:.0f} TFLOP/s; max|d| vs SDPA {r['max_abs_diff_vs_sdpa']:.1e}")
    out: dict[str, Any] = {"tokens": tokens, "kernels": rows}
    applied = Applied()
    choose_attention(gen.pipe, "flash_4", device, applied)
    if applied.attention_backend == "flash_4":
        seconds, _ = timed(run.forward(), device, repeats=1, warmup=1)
        check.row("forward, eager, FlashAttention-4", seconds, "s", run.tflops(seconds))
        out["fa4_forward_s"] = seconds
    else:
        check.row("forward, eager, FlashAttention-4", None, "", next(n for n in applied.notes if "flash_4" in n))
    out["fa4_notes"] = applied.notes
    return out


# 4. compile -------------------------------------------------------------------------------------------------------
def compile_part(run: Run) -> dict[str, Any]:
    gen, device, check = run.generator, run.device, run.check
    applied = Applied()
    choose_attention(gen.pipe, "auto", device, applied)
    apply_compile(gen.pipe, run.speed, applied)
    gen.applied.compiled = True
    gen.applied.attention_backend = applied.attention_backend
    cache = run.cache = CompileCache(run.tmp / "compile-cache",
                                     cache_key(gen.pipe.transformer, device, {"check": "compile"}))
    cache.load()
    first, _ = timed(run.forward(), device)
    seconds, _ = timed(run.forward(), device, repeats=1 if run.small else 2)
    saved = cache.save()
    check.row("first forward, compiling", first, "s", f"attention {applied.attention_backend}")
    check.row("forward, compiled", seconds, "s", run.tflops(seconds))
    size = cache.path.stat().st_size / 1e6 if saved else None
    check.row("compile cache saved", size, "MB")
    return {"first_forward_s": first, "forward_s": seconds, "attention": applied.attention_backend, "cache_mb": size}


# 5. warm restart --------------------------------------------------------------------------------------------------
def warm_restart(run: Run) -> dict[str, Any]:
    import torch._dynamo

    assert run.cache is not None
    torch._dynamo.reset()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(run.tmp / "inductor-after-restart")
    os.environ["TRITON_CACHE_DIR"] = str(run.tmp / "triton-after-restart")
    started = time.perf_counter()
    loaded = run.cache.load()
    run.generator.warmup()
    synchronize(run.device)
    seconds = time.perf_counter() - started
    run.check.row("model loaded to ready, warm compile cache", seconds, "s",
                  f"cache {'loaded' if loaded else 'NOT loaded'}; target <= 15 s")
    return {"seconds": seconds, "cache_loaded": loaded}


# 6. default step --------------------------------------------------------------------------------------------------
def default_step(run: Run) -> dict[str, Any]:
    gen, check = run.generator, run.check
    r = _run_steps(gen, run.params, run.image)
    check.row(f"step, default ({'compiled, ' if gen.applied.compiled else ''}"
              f"{gen.applied.attention_backend}), CFG", r["step_s"], "s/step", "steps 2..N")
    if r["step_s"]:
        check.row("30-step video (estimate: first step + 29 steps + decode)",
                  r["first_step_s"] + 29 * r["step_s"] + r["last_step_to_return_s"], "s")
    check.row("peak GPU memory, default", r["peak_gib"], "GiB")
    return r


# 6b. profile: where the compiled forward's time goes (the non-attention half is the larger gap) ---------------------
def profile(run: Run) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profiler(activities=activities) as prof:
        run.forward()()
        synchronize(run.device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"  # self: kernels, not their callers
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    top = [{"name": e.key[:100], "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total,
            "calls": e.count} for e in events[:15]]
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))
    if top:
        run.check.row("profiled compiled forward: top kernel", top[0]["ms"], "ms",
                      f"{top[0]['share']:.0%} of the time: {top[0]['name'][:60]}")
    return {"top_by_time": top}


# 7. fast mode -----------------------------------------------------------------------------------------------------
def _load_speed_lora(run: Run) -> tuple[LoraInfo, float]:
    """The speed LoRA (a file, or a random one) loaded as the unfused speed adapter, over a fused random LoRA when
    --fused-lora-rank asks: its LoraInfo and the seconds it took."""
    args, gen = run.args, run.generator
    stack = gen.lora_stack
    started = time.perf_counter()
    if args.fused_lora_rank and not stack.loras:
        stack.load(Path("random-particalize-lora"), 1.0,
                   state_dict=random_lora(gen.pipe.transformer, args.fused_lora_rank, seed=1))
        stack.fuse()
    if args.lora is not None:
        info = stack.load(args.lora, 1.0, speed=True)
    else:
        rank = args.speed_lora_rank if not run.small else min(args.speed_lora_rank, 4)
        info = stack.load(Path(f"random-speed-lora-rank{rank}"), 1.0, speed=True,
                          state_dict=random_lora(gen.pipe.transformer, rank, seed=2))
    synchronize(run.device)
    return info, time.perf_counter() - started


def fast_mode(run: Run) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    gen, check, fused_rank = run.generator, run.check, run.args.fused_lora_rank
    info, load_s = _load_speed_lora(run)
    check.row("speed LoRA built + loaded (LoraStack, unfused adapter)", load_s, "s",
              f"{info.path.name}: {info.modules} layers rank {info.rank}"
              + (f"; over a fused random LoRA rank {fused_rank}" if fused_rank else ""))
    graphs = counters["stats"]["unique_graphs"]
    gen.lora_stack.use(True)  # what the server's warm-up does: the adapter graph compiled once, before any request
    first, _ = timed(run.forward(), run.device)
    compiled_graphs = counters["stats"]["unique_graphs"] - graphs
    check.row("first forward with the speed LoRA (compiling its graph)" if gen.applied.compiled else
              "first forward with the speed LoRA", first, "s", f"{compiled_graphs} graphs compiled")
    fast = run.params.model_copy(update={"mode": FAST, "prompt": PROMPT + ", fast"})
    r = _run_steps(gen, fast, run.image)
    recompiled = counters["stats"]["unique_graphs"] - graphs - compiled_graphs
    resolved = gen.resolve(fast, run.image)
    check.row("fast mode step (speed LoRA unfused)", r["step_s"], "s/step", "one forward: guidance off")
    check.row("fast mode video (4 steps, scale 1, encoders + VAE)", r["video_s"], "s",
              f"{resolved.steps} steps, scale {resolved.scale:g}, shift {resolved.flow_shift:g}; "
              f"{recompiled} recompiles; target <= 10 s")
    gen.lora_stack.use(False)  # the parts after this one measure the normal mode, the speed LoRA loaded but off
    return {**r, "lora": info.describe(), "load_s": load_s, "first_forward_s": first,
            "graphs_compiled": compiled_graphs, "recompiles_in_video": recompiled, "steps": resolved.steps,
            "scale": resolved.scale}


# 8. VAE decode ----------------------------------------------------------------------------------------------------
def cached_mode(run: Run) -> dict[str, Any]:
    """7b. A 30-step cached video with the shipped calibration, the hooks put on the warm model and taken off after."""
    gen, check, params, image, args = run.generator, run.check, run.params, run.image, run.args
    path = shipped_calibration("wan2.1-i2v-14b-480p" if run.small else args.model)
    if path is None:
        check.row("cached mode video", None, "", f"no MagCache calibration ships for {args.model}")
        return {"skipped": f"no calibration for {args.model}"}
    calibration = MagCalibration.load(path)
    settings = MagSettings()
    mag_speed = SpeedOptions(attention_backend="auto", compile=True, step_cache="mag", mag=settings)
    compiled = gen.applied.compiled
    if compiled:  # compiled blocks around the compiler-disabled hooks would run eager: compiled beneath them
        uncompile(gen.pipe, gen.applied)
    apply_step_cache(gen.pipe, mag_speed, gen.applied, calibration=calibration)
    try:
        out: dict[str, Any] = {}
        if compiled:
            apply_compile(gen.pipe, mag_speed, gen.applied)
            started = time.perf_counter()
            gen.generate(params.model_copy(update={"steps": 2}), image)  # what the warm-up compiles
            synchronize(run.device)
            out["first_run_compiling_s"] = time.perf_counter() - started
            check.row("first run under the MagCache hooks (compiling beneath them)", out["first_run_compiling_s"],
                      "s", "2 steps, normal mode")
        cached = params.model_copy(update={"steps": 30, "mode": CACHED, "prompt": PROMPT + ", cached"})
        r = _run_steps(gen, cached, image)
        planned = {steps: planned_schedule(calibration, steps, settings) for steps in (30, 40)}
        done = r["computed_per_pass"]
        check.row("cached mode video (30 steps, CFG, MagCache, encoders + VAE)", r["video_s"], "s",
                  f"computed {done.get('cond')} of 30 steps ({r['schedule']['computedSteps']}); "
                  f"target <= 70 s bf16 (480P H200)")
        check.row("cached mode, s/step over the video", r["video_s"] / 30, "s/step", "30 steps, both passes")
        check.row("cached mode, computed step (both passes)", r["computed_step_s"], "s/step", "median")
        check.row("cached mode, skipped step (residual reused)", r["skipped_step_s"], "s/step", "median")
        check.row("cached mode at 40 steps (planned, not run)", len(planned[40].computed["cond"]), "steps",
                  f"of 40 computed ({ranges(planned[40].computed['cond'])})")
        return {**out, **r, "calibration": calibration.source, "threshold": settings.threshold,
                "max_skip_steps": settings.max_skip_steps, "retention_ratio": settings.retention_ratio,
                "planned": {steps: s.record() for steps, s in planned.items()},
                "matches_plan": r["schedule"] == planned[30].record()}
    finally:
        remove_step_cache(gen.pipe, gen.applied)
        if compiled and not gen.applied.compiled:
            apply_compile(gen.pipe, SpeedOptions(attention_backend="auto", compile=True), gen.applied)


def vae_decode(run: Run) -> dict[str, Any]:
    gen, params, device = run.generator, run.params, run.device
    vae = gen.pipe.vae
    frames = (params.num_frames - 1) // gen.pipe.vae_scale_factor_temporal + 1
    shape = (1, vae.config.z_dim, frames, params.height // gen.pipe.vae_scale_factor_spatial,
             params.width // gen.pipe.vae_scale_factor_spatial)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        vae.to(dtype)
        latents = torch.randn(shape, device=device, dtype=dtype)
        with torch.no_grad():
            seconds, _ = timed(lambda latents=latents: vae.decode(latents, return_dict=False), device,
                               warmup=1 if dtype == torch.float32 else 0)
        out[str(dtype)] = seconds
        run.check.row(f"VAE decode alone, {str(dtype).split('.')[-1]}", seconds, "s")
    vae.to(torch.float32)
    return out


# 9. text encoder on the CPU ---------------------------------------------------------------------------------------
def text_encoder_cpu(run: Run) -> dict[str, Any]:
    device, encoder = run.device, run.generator.pipe.text_encoder
    if device.type != "cuda":
        run.check.row("GPU memory freed by text encoder on CPU", None, "", "no GPU")
        return {}
    before = torch.cuda.memory_allocated(device)
    encoder.to("cpu")
    torch.cuda.empty_cache()
    freed = (before - torch.cuda.memory_allocated(device)) / 2**30
    encoder.to(device)
    run.check.row("GPU memory freed by text encoder on CPU", freed, "GiB")
    return {"freed_gib": freed}


# 10. float8 -------------------------------------------------------------------------------------------------------
def float8(run: Run) -> dict[str, Any]:
    import torch._dynamo

    gen, device, check = run.generator, run.device, run.check
    applied = Applied()
    apply_float8(gen.pipe, device, applied, gen.lora_stack.switched_parameters())
    if not applied.float8:
        check.row("forward, float8 + compiled", None, "", applied.notes[-1])
        return {"notes": applied.notes}
    torch._dynamo.reset()
    apply_compile(gen.pipe, run.speed, applied)
    first, _ = timed(run.forward(), device)
    seconds, _ = timed(run.forward(), device, repeats=2)
    check.row("first forward, float8, compiling", first, "s")
    speed_lora = "; speed LoRA loaded (off), its adapters in bf16" if gen.lora_stack.has_speed else ""
    check.row("forward, float8 + compiled", seconds, "s", run.tflops(seconds) + speed_lora)
    check.row("step, float8 + compiled, CFG (estimate: 2 forwards)", 2 * seconds, "s/step", "target <= 4.0")
    memory = torch.cuda.memory_allocated(device) / 2**30
    check.row("GPU memory allocated with float8 transformer", memory, "GiB")
    return {"first_forward_s": first, "forward_s": seconds, "memory_gib": memory}


# 11. one prompt encoded on the CPU (what a new prompt costs with the text encoder kept there) ----------------------
def text_encoder_cpu_encode(run: Run) -> dict[str, Any]:
    from pipeline.embeddings import EmbeddingCache

    gen = run.generator
    encoder_device = next(gen.pipe.text_encoder.parameters()).device
    gen.pipe.text_encoder.to("cpu")
    try:
        cache = EmbeddingCache(gen.pipe, 0, encode_device=torch.device("cpu"))
        seconds, _ = timed(lambda: cache.prompt_embeds(PROMPT, run.params.negative_prompt, True,
                                                       gen.max_sequence_length, run.device), run.device)
    finally:
        gen.pipe.text_encoder.to(encoder_device)
    run.check.row("prompt + negative encoded on the CPU (new prompt)", seconds, "s",
                  f"{torch.get_num_threads()} CPU threads; cached prompts skip it")
    return {"seconds": seconds, "threads": torch.get_num_threads()}


@dataclass(frozen=True)
class Part:
    """One measurement on the built model: its time estimate (on --small, at the real size) and what it needs."""

    name: str
    small_s: float
    real_s: float
    measure: Callable[[Run], dict[str, Any]]
    ready: Callable[[Run], bool] = lambda run: True


PARTS = (
    Part("attention", 30, 30, attention, lambda run: run.captured),
    Part("compile", 40, 45, compile_part, lambda run: run.captured),
    Part("warm_restart", 20, 40, warm_restart, lambda run: run.cache is not None),
    Part("default_step", 10, 30, default_step),
    Part("profile", 5, 15, profile, lambda run: run.captured),
    Part("fast_mode", 20, 70, fast_mode),  # load ~10 s, adapter compile ~25 s, video ~20 s
    # compile beneath the hooks ~25 s, a 30-step cached video: 11 computed steps x 2 passes ~ 70 s at 480P
    Part("cached_mode", 30, 110, cached_mode),
    Part("vae_decode", 15, 15, vae_decode),
    Part("text_encoder_cpu", 10, 10, text_encoder_cpu),
    Part("float8", 5, 100, float8, lambda run: run.captured),
    Part("text_encoder_cpu_encode", 5, 60, text_encoder_cpu_encode),
)
"""Parts 3 to 11, in the order they run, after the build, the eager step and the input capture."""


# 12. one video over N GPUs (context parallelism, Ulysses): the step time against N ---------------------------------
def context_parallel(run: Run) -> None:
    """Skipped, with the reason, with fewer than 2 GPUs (not on --small); the single-GPU model freed first."""
    gpus = torch.cuda.device_count() if run.device.type == "cuda" else 0
    if not run.small and gpus < 2:
        reason = f"needs 2 or more GPUs, {gpus} here"
        run.check.parts["context_parallel"] = {"skipped": reason}
        run.check.row("context_parallel", None, "", reason)
        return
    run.gen = run.inputs = run.cache = None  # the single-GPU model leaves the GPUs to the ranks
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    run.check.part("context_parallel", 30 if run.small else 150,
                   lambda: context_parallel_steps(run.check, run.args, gpus, run.small))


def main(argv: list[str] | None = None) -> int:
    run = prepare(parse_args(argv))
    run.check.part("build", 60, lambda: build(run))
    if run.gen is None:
        return _finish(run)
    run.inputs = Inputs(run.gen.pipe.transformer)
    run.check.part("eager_step", 40, lambda: eager_step(run))
    capture_inputs(run)
    for part in PARTS:
        if part.ready(run):
            run.check.part(part.name, part.small_s if run.small else part.real_s, lambda p=part: p.measure(run))
            _write(run)  # after every part: a run stopped by its time limit keeps what it measured
    context_parallel(run)
    return _finish(run)


def context_parallel_steps(check: Check, args: argparse.Namespace, gpus: int, small: bool) -> dict[str, Any]:
    """Step time of one video over N processes (benchmarks/parallel_steps.py): N = 2 and the most GPUs that divide
    the 40 heads, within the budget (a degree builds the model on every rank); on --small, 2 gloo processes."""
    from benchmarks.parallel_steps import measure, real_params, small_params

    degrees = [2] if small else sorted({2, max(d for d in (2, 4, 5, 8) if d <= gpus)})
    params = small_params() if small else real_params()
    results = {}
    for degree in degrees:
        if degree != degrees[0] and check.elapsed() + 150 > check.budget_s:
            check.row(f"step over {degree} GPUs", None, "", "time budget")
            continue
        r = measure(degree, params, args.model, small)
        results[degree] = r
        where = f"{degree} gloo processes" if small else f"{degree} GPUs"
        check.row(f"step, Ulysses over {where}, CFG", r["step_s"], "s/step",
                  f"attention {r['attention_backend']}; build {r['build_s']:.0f}s; published 480P: 5.18 s on 1 H100, "
                  "0.75 s on 8 (LightX2V)")
    return {"degrees": results}


def _write(run: Run) -> Path:
    """The JSON of what is measured so far."""
    check, args = run.check, run.args
    out = args.out or Path(f"benchmarks/results/device-check-{'cpu-small' if run.small else check.device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"date": dt.datetime.now(dt.timezone.utc).isoformat(), "device": run.device_name, "versions": _versions(),
            "small": run.small, "inputs": run.params.wiro_inputs(), "total_s": check.elapsed(), "rows": check.rows,
            "parts": check.parts}
    out.write_text(json.dumps(body, indent=2, default=str))
    return out


def _finish(run: Run) -> int:
    """Prints the table, writes the JSON; 1 when a part failed."""
    check, args, params, small = run.check, run.args, run.params, run.small
    total = check.elapsed()
    print(f"\ndevice check, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {run.device_name}, "
          f"{'tiny preset (--small)' if small else args.model + ' with random weights'}, "
          f"{params.width}x{params.height}, {params.num_frames} frames; {total:.0f} s in all")
    print(f"{'what':<58}{'value':>12}  {'unit':<9} note")
    for r in check.rows:
        value = "-" if r["value"] is None else f"{r['value']:.3f}" if r["value"] < 100 else f"{r['value']:.1f}"
        print(f"{r['what']:<58}{value:>12}  {r['unit']:<9} {r['note']}")
    print(f"wrote {_write(run)}")
    failed = [k for k, v in check.parts.items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
