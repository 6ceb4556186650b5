"""The warm model: loaded once, then one video per call with progress and cooperative interruption."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pipeline.acceleration import Applied, SpeedOptions, apply_speed_options, compile_cache_for, resolve_compile
from pipeline.embeddings import EmbeddingCache
from pipeline.errors import Interrupted
from pipeline.fast import FAST, NORMAL, FastMode
from pipeline.interrupt import BlockInterrupt, InterruptPoints, StopCheck
from pipeline.loader import load_base_pipeline, pick_device
from pipeline.lora import LoraInfo, LoraStack
from pipeline.params import GenerationParams, Limits, limits_from_settings, no_speed_lora, resolve_size
from pipeline.presets import ModelPreset
from pipeline.scheduler import ShiftedSchedulers, step_distill_scheduler
from pipeline.video import write_mp4

if TYPE_CHECKING:
    from particalize.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepProgress:
    step: int
    total: int
    elapsed: float

    @property
    def percentage(self) -> float:
        return 100.0 * self.step / self.total if self.total else 100.0


@dataclass
class Video:
    frames: np.ndarray
    """(F, H, W, 3) float32 in [0, 1]."""
    params: GenerationParams
    """The parameters actually used: resolved width/height and seed."""
    timings: dict[str, float] = field(default_factory=dict)


ProgressFn = Callable[[StepProgress], None]
StopFn = Callable[[], bool]


class VideoGenerator:
    """Owns one WanImageToVideoPipeline on one device; calls are serialized (one GPU, one video at a time)."""

    def __init__(
        self,
        preset: ModelPreset,
        *,
        weights_dir: Path,
        device: str = "auto",
        lora_path: Path | None = None,
        lora_strength: float = 1.0,
        fuse_lora: bool = False,
        limits: Limits | None = None,
        max_sequence_length: int | None = None,
        speed: SpeedOptions | None = None,
        loras: Sequence[tuple[Path, float]] = (),
        speed_lora: tuple[Path, float] | None = None,
        lora_strict: bool = True,
        mode: str = NORMAL,
        fast: FastMode | None = None,
        random_weights: bool = False,
    ) -> None:
        started = time.perf_counter()
        self.preset = preset
        speed = speed or SpeedOptions()
        self.device = pick_device(device)
        if speed.context_parallel != "none":
            from pipeline.parallel import rank_device

            self.device = rank_device(self.device)
        offloaded = speed.memory_mode != "none"
        self.random_weights = random_weights and not preset.is_tiny
        """Real-size model built with random values (pipeline.random_weights): every video is noise."""
        self.pipe = load_base_pipeline(preset, weights_dir, self.device, place=not offloaded,
                                       random_weights=random_weights)
        self.pipe.set_progress_bar_config(disable=True)
        if mode == FAST and speed_lora is None:
            raise ValueError("fast mode needs a step-distilled speed LoRA: set PARTICALIZE_SPEED_LORA")
        self.lora_stack = LoraStack(self.pipe, strict=lora_strict)
        stack = ([(Path(lora_path), lora_strength)] if lora_path is not None else []) + list(loras)
        for path, strength in stack:
            self.lora_stack.load(path, strength)
        if stack and resolve_compile(speed, self.device)[0] and not fuse_lora:
            log.info("fusing the LoRAs before compiling (compiled graphs should not carry adapter layers)")
            fuse_lora = True
        if fuse_lora:
            self.lora_stack.fuse()
        if speed_lora is not None:  # after fusing: it stays an adapter, switched on per request
            self.lora_stack.load(speed_lora[0], speed_lora[1], speed=True)
        self.mode = mode
        self.fast = fast or FastMode()
        self.lora_stack.use(mode == FAST)
        self.speed = speed
        self.applied: Applied = apply_speed_options(self.pipe, speed, self.device,
                                                    float8_keep=self.lora_stack.switched_parameters())
        encode_device = torch.device("cpu") if self.applied.text_encoder_on_cpu else None
        self.embeddings = EmbeddingCache(self.pipe, speed.encode_cache_size, encode_device=encode_device)
        self.schedulers = ShiftedSchedulers(self.pipe.scheduler)
        self.fast_schedulers = ShiftedSchedulers(step_distill_scheduler(self.fast.flow_shift))
        self.interrupt_points = InterruptPoints(self.pipe)
        self.limits = limits or Limits()
        self.max_sequence_length = max_sequence_length or getattr(self.pipe.tokenizer, "model_max_length", 512)
        self.max_sequence_length = min(self.max_sequence_length, 512)
        self._lock = threading.Lock()
        if self.applied.compiled:
            cache = compile_cache_for(self.pipe, speed, self.applied, self.device)
            if cache is not None:
                cache.load()
            self.warmup()
            if cache is not None:
                cache.save()
        self.load_seconds = time.perf_counter() - started
        log.info("model %s ready on %s in %.1fs", preset.name, self.device, self.load_seconds)

    def warmup(self) -> None:
        """Short runs at start so that the first task does not pay for compilation: one per mode when a speed
        LoRA is loaded (its active adapters are guarded Python state, so each mode has its own compiled graphs;
        switching between warmed modes then compiles nothing)."""
        started = time.perf_counter()
        image = Image.new("RGB", (832, 480), (127, 127, 127))
        modes = (NORMAL, FAST) if self.lora_stack.has_speed else (None,)
        for mode in modes:
            self.generate(GenerationParams(numFrames=9, steps=2, seed=0, mode=mode), image)
        log.info("warm-up run%s took %.1fs", "s (normal and fast)" if len(modes) > 1 else "",
                 time.perf_counter() - started)

    @property
    def loras(self) -> list[LoraInfo]:
        """Every LoRA loaded, in order (the speed LoRA last)."""
        return list(self.lora_stack.loras)

    @property
    def lora(self) -> LoraInfo | None:
        """The first LoRA of the stack (the Particalize LoRA), if any."""
        return next((info for info in self.lora_stack.loras if not info.speed), None)

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.pipe.transformer.config.patch_size[1]

    def resolve(self, params: GenerationParams, image: Image.Image) -> GenerationParams:
        """Fix seed, size and mode before running, so the recorded parameters are the ones used."""
        mode = params.mode or self.mode
        if mode == FAST:
            if not self.lora_stack.has_speed:
                raise no_speed_lora()
            params = self.fast.apply(params)
        else:
            params = params.model_copy(update={"mode": NORMAL})
        width, height = resolve_size(
            image.size, params.width, params.height, self.preset.max_area, self.size_multiple
        )
        return params.with_seed().model_copy(update={"width": width, "height": height})

    def generate(
        self,
        params: GenerationParams,
        image: Image.Image,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        interrupt: StopCheck | None = None,
    ) -> Video:
        """Run one video. `should_stop` is checked after every step (it may do I/O); `interrupt` before every
        transformer block and VAE decoder call (it must be cheap, e.g. `threading.Event.is_set`). When either
        says stop, the run raises Interrupted (a run stopped in its last step never starts the VAE decode)."""
        params = self.resolve(params, image.convert("RGB"))
        image = image.convert("RGB")
        with self._lock:
            started = time.perf_counter()
            fast = params.mode == FAST
            self.lora_stack.use(fast)
            self.pipe.scheduler = (self.fast_schedulers if fast else self.schedulers).for_shift(params.flow_shift)
            steps = {"done": 0}

            def on_step_end(pipe: object, i: int, t: object, kwargs: dict) -> dict:
                done = steps["done"] = i + 1
                if progress is not None:
                    progress(StepProgress(done, params.steps, time.perf_counter() - started))
                if (should_stop is not None and should_stop()) or (interrupt is not None and interrupt()):
                    raise Interrupted(done, params.steps)
                return {}

            self.interrupt_points.arm(interrupt)
            try:
                guidance = params.scale > 1.0
                prompt_embeds, negative_embeds = self.embeddings.prompt_embeds(
                    params.prompt, params.negative_prompt, guidance, self.max_sequence_length, self.device
                )
                if self.applied.guidance_hook is not None:
                    self.applied.guidance_hook.set_negative(negative_embeds)
                result = self.pipe(
                    image=image,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_embeds,
                    height=params.height,
                    width=params.width,
                    num_frames=params.num_frames,
                    num_inference_steps=params.steps,
                    guidance_scale=params.scale,
                    generator=torch.Generator(device="cpu").manual_seed(params.seed),
                    output_type="np",
                    callback_on_step_end=on_step_end,
                    max_sequence_length=self.max_sequence_length,
                )
            except BlockInterrupt:
                self._release()
                raise Interrupted(steps["done"], params.steps) from None
            except BaseException:
                self._release()
                raise
            finally:
                self.interrupt_points.arm(None)
            frames = np.asarray(result.frames[0], dtype=np.float32)
            return Video(frames=frames, params=params, timings={"generate": time.perf_counter() - started})

    def _release(self) -> None:
        """After an interrupted or failed run: reset the step cache so the warm model serves the next task. The
        run's activations are still referenced by the exception being handled here and are freed by reference
        counting once the caller drops it (they form no cycle), so no garbage collection is run: it would free
        nothing and took about a second after each kill on a busy machine."""
        if getattr(self.pipe.transformer, "is_cache_enabled", False):
            self.pipe.transformer._reset_stateful_cache()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def render(
        self,
        params: GenerationParams,
        image: Image.Image,
        out: Path,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> Video:
        video = self.generate(params, image, progress=progress, should_stop=should_stop)
        started = time.perf_counter()
        write_mp4(video.frames, out, fps=video.params.fps)
        video.timings["encode"] = time.perf_counter() - started
        return video


def generator_from_settings(settings: Settings) -> VideoGenerator:
    """Build the warm generator the settings describe (model preset, LoRAs, fast mode, device, limits)."""
    from pipeline.presets import get_preset
    from weights.locate import lora_files_from_settings, speed_lora_file

    speed = speed_lora_file(settings)
    speed_lora = (speed[1], speed[0].strength) if speed is not None else None
    return VideoGenerator(
        get_preset(settings.model, max_area=settings.model_max_area),
        weights_dir=settings.weights_dir,
        device=settings.device,
        loras=[(path, source.strength) for source, path in lora_files_from_settings(settings)],
        speed_lora=speed_lora,
        lora_strict=settings.lora_strict,
        mode=settings.mode,
        fast=FastMode(settings.fast_steps, settings.fast_scale, settings.fast_flow_shift),
        fuse_lora=settings.fuse_lora,
        limits=limits_from_settings(settings),
        speed=speed_from_settings(settings),
        random_weights=settings.random_weights,
    )


def speed_from_settings(settings: Settings) -> SpeedOptions:
    return SpeedOptions(
        attention_backend=settings.attention_backend,
        compile=settings.compile,
        compile_dynamic=settings.compile_dynamic,
        compile_mode=settings.compile_mode,
        cfg_batch=settings.cfg_batch,
        step_cache=settings.step_cache,
        step_cache_threshold=settings.step_cache_threshold,
        step_cache_interval=settings.step_cache_interval,
        memory_mode=settings.memory_mode,
        vae_tiling=settings.vae_tiling,
        float8=settings.float8,
        encode_cache_size=settings.encode_cache_size,
        context_parallel=settings.context_parallel,
        compile_cache_dir=(settings.compile_cache_dir or settings.data_dir / "compile-cache")
        if settings.compile_cache else None,
        fuse_qkv=settings.fuse_qkv,
        text_encoder_on_cpu=settings.text_encoder_on_cpu,
    )

