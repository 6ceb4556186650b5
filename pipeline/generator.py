"""The warm model: loaded once, then one video per call with progress and cooperative interruption."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pipeline.acceleration import Applied, SpeedOptions, apply_speed_options
from pipeline.embeddings import EmbeddingCache
from pipeline.errors import Interrupted
from pipeline.interrupt import BlockInterrupt, InterruptPoints, StopCheck
from pipeline.loader import load_base_pipeline, pick_device
from pipeline.lora import LoraInfo, load_lora
from pipeline.params import GenerationParams, Limits, limits_from_settings, resolve_size
from pipeline.presets import ModelPreset
from pipeline.scheduler import ShiftedSchedulers
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
    ) -> None:
        started = time.perf_counter()
        self.preset = preset
        speed = speed or SpeedOptions()
        self.device = pick_device(device)
        if speed.context_parallel != "none":
            from pipeline.parallel import rank_device

            self.device = rank_device(self.device)
        offloaded = speed.memory_mode != "none"
        self.pipe = load_base_pipeline(preset, weights_dir, self.device, place=not offloaded)
        self.pipe.set_progress_bar_config(disable=True)
        self.lora: LoraInfo | None = None
        if lora_path is not None:
            if speed.compile and not fuse_lora:
                log.info("fusing the LoRA before compiling (compiled graphs should not carry adapter layers)")
                fuse_lora = True
            self.lora = load_lora(self.pipe, lora_path, strength=lora_strength, fuse=fuse_lora)
        self.speed = speed
        self.applied: Applied = apply_speed_options(self.pipe, speed, self.device)
        self.embeddings = EmbeddingCache(self.pipe, speed.encode_cache_size)
        self.schedulers = ShiftedSchedulers(self.pipe.scheduler)
        self.interrupt_points = InterruptPoints(self.pipe)
        self.limits = limits or Limits()
        self.max_sequence_length = max_sequence_length or getattr(self.pipe.tokenizer, "model_max_length", 512)
        self.max_sequence_length = min(self.max_sequence_length, 512)
        self._lock = threading.Lock()
        if speed.compile:
            self.warmup()
        self.load_seconds = time.perf_counter() - started
        log.info("model %s ready on %s in %.1fs", preset.name, self.device, self.load_seconds)

    def warmup(self) -> None:
        """One short run at start so that the first task does not pay for compilation."""
        started = time.perf_counter()
        image = Image.new("RGB", (832, 480), (127, 127, 127))
        self.generate(GenerationParams(numFrames=9, steps=2, seed=0), image)
        log.info("warm-up run took %.1fs", time.perf_counter() - started)

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.pipe.transformer.config.patch_size[1]

    def resolve(self, params: GenerationParams, image: Image.Image) -> GenerationParams:
        """Fix seed and size before running, so the recorded parameters are the ones used."""
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
            self.pipe.scheduler = self.schedulers.for_shift(params.flow_shift)
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
        """After an interrupted or failed run: drop activations so the warm model serves the next task."""
        self.pipe._interrupt = False
        if getattr(self.pipe.transformer, "is_cache_enabled", False):
            self.pipe.transformer._reset_stateful_cache()
        gc.collect()
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
    """Build the warm generator the settings describe (model preset, LoRA, device, limits)."""
    from pipeline.presets import get_preset
    from weights.locate import lora_file_from_settings

    return VideoGenerator(
        get_preset(settings.model),
        weights_dir=settings.weights_dir,
        device=settings.device,
        lora_path=lora_file_from_settings(settings),
        lora_strength=settings.lora_strength,
        fuse_lora=settings.fuse_lora,
        limits=limits_from_settings(settings),
        speed=speed_from_settings(settings),
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
    )

