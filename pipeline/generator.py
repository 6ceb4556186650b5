"""The warm model: loaded once, then one video per call with progress and cooperative interruption."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.devices import pick_device
from pipeline.embeddings import EmbeddingCache
from pipeline.errors import Interrupted, LoraFuseRefused, OutOfMemory
from pipeline.fast import CACHED, FAST, NORMAL, FastMode
from pipeline.interrupt import BlockInterrupt, InterruptPoints, StopCheck
from pipeline.loader import load_base_pipeline, preset_dir
from pipeline.lora.request import check_lora_file, request_loras
from pipeline.lora.stack import LoraInfo, LoraStack, LoraStackOptions
from pipeline.memory_check import check_memory
from pipeline.out_of_memory import is_out_of_memory, out_of_memory_message
from pipeline.params import GenerationParams, ResolvedParams, no_speed_lora, no_step_cache, resolve_size
from pipeline.presets import ModelPreset
from pipeline.resolve import Modes, with_mode
from pipeline.scheduler import ShiftedSchedulers, step_distill_scheduler
from pipeline.speed.acceleration import (
    WARMUP_REVERT_ORDER,
    Applied,
    SpeedOptions,
    allow_graphs,
    apply_speed_options,
    compile_cache_for,
    resolve_compile,
    revert,
)
from pipeline.speed.step_cache_mag import (
    MagCacheUnavailable,
    MagCalibration,
    StepSchedule,
    find_calibration,
    refusal,
)
from pipeline.video import write_mp4
from pipeline.weight_files.files import WeightFiles
from pipeline.weight_files.loaded_file import LoadedFile, loaded_file_of

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
    notes: list[str] = field(default_factory=list)
    """What happened on the way worth telling (e.g. a decode retried with VAE tiling)."""
    schedule: StepSchedule | None = None
    """Cached mode: the steps each guidance pass computed (the others reused MagCache's residual)."""


ProgressFn = Callable[[StepProgress], None]
StopFn = Callable[[], bool]


@dataclass(frozen=True)
class GeneratorOptions:
    """What a warm generator is built from; the entry points compose it once from their own configuration."""

    preset: ModelPreset
    weights_dir: Path
    device: str = "auto"
    random_weights: bool = False
    """Build the real-size model with random values (pipeline.random_weights): every video is noise."""
    weight_files: WeightFiles = field(default_factory=WeightFiles)
    """Single files replacing the preset's transformer and/or text encoder (fp8, GGUF, ComfyUI layouts)."""
    loras: LoraStackOptions = field(default_factory=LoraStackOptions)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    fast: FastMode = field(default_factory=FastMode)
    mode: str = NORMAL
    """The mode of a request that names none; fast needs `loras.speed_lora`."""
    memory_check: bool = True
    """Refuse a configuration the device has no memory for before building it (pipeline.memory_check)."""


class VideoGenerator:
    """Owns one WanImageToVideoPipeline on one device; calls are serialized (one GPU, one video at a time)."""

    def __init__(self, options: GeneratorOptions) -> None:
        started = time.perf_counter()
        self.options = options
        self.preset = preset = options.preset
        self.speed = speed = options.speed
        self.mode = options.mode
        self.fast = options.fast
        self.device = pick_device(options.device)
        if speed.context_parallel != "none":
            from pipeline.speed.context_parallel import rank_device

            self.device = rank_device(self.device)
        offloaded = speed.memory_mode != "none"
        mag_calibration = self._mag_calibration(options)
        self.random_weights = options.random_weights and not preset.is_tiny
        """Real-size model built with random values (pipeline.random_weights): every video is noise."""
        if options.memory_check:
            check_memory(preset, options.weights_dir, self.device, float8=speed.float8,
                         text_encoder_on_cpu=speed.text_encoder_on_cpu, memory_mode=speed.memory_mode,
                         weight_files=options.weight_files)
        self.pipe = load_base_pipeline(preset, options.weights_dir, self.device, place=not offloaded,
                                       random_weights=options.random_weights, weight_files=options.weight_files)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_notes: list[str] = []
        """What loading decided that the speed options' notes should carry (kept unfused LoRAs)."""
        self.lora_stack = self._load_loras(options.loras)
        self.lora_stack.use(self.mode == FAST)
        self.applied: Applied = apply_speed_options(self.pipe, speed, self.device,
                                                    float8_keep=self.lora_stack.switched_parameters(),
                                                    mag_calibration=mag_calibration)
        self.applied.notes.extend(self.load_notes)
        encode_device = torch.device("cpu") if self.applied.text_encoder_on_cpu else None
        self.embeddings = EmbeddingCache(self.pipe, speed.encode_cache_size, encode_device=encode_device)
        self.schedulers = ShiftedSchedulers(self.pipe.scheduler)
        self.fast_schedulers = ShiftedSchedulers(step_distill_scheduler(self.fast.flow_shift))
        self.interrupt_points = InterruptPoints(self.pipe)
        for problem in self.interrupt_points.problems:
            log.warning("interrupt: %s", problem)
        self.max_sequence_length = min(getattr(self.pipe.tokenizer, "model_max_length", 512), 512)
        self._lock = threading.RLock()  # generate holds it around _generate's own
        if self.applied.compiled:  # each tool (and mode) compiles graphs of its own: room for all of them
            allow_graphs(len(self.lora_stack.tools) * (2 if self.lora_stack.has_speed else 1))
        if self._needs_warmup():
            cache = compile_cache_for(self.pipe, speed, self.applied, self.device)
            if cache is not None:
                cache.load()
            self._warm_up_or_fall_back()
            if cache is not None and self.applied.compiled:
                cache.save()
        self.load_seconds = time.perf_counter() - started
        log.info("model %s ready on %s in %.1fs", preset.name, self.device, self.load_seconds)

    def _mag_calibration(self, options: GeneratorOptions) -> MagCalibration | None:
        """Cached mode's calibration, or why it cannot run here: refused at start, before any weights are read."""
        if self.mode == CACHED and options.speed.step_cache != "mag":
            raise MagCacheUnavailable("cached mode needs the MagCache step cache: set --step-cache mag "
                                      "(PARTICALIZE_STEP_CACHE=mag)")
        if options.speed.step_cache != "mag":
            return None
        reason = refusal(options.speed.context_parallel)
        if reason is not None:
            raise MagCacheUnavailable(reason)
        return find_calibration(options.preset.name, preset_dir(options.preset, options.weights_dir),
                                options.speed.mag)

    def _load_loras(self, options: LoraStackOptions) -> LoraStack:
        """The stack in order, fused when asked (always before compiling: compiled graphs should not carry adapter
        layers), then the speed LoRA as an adapter switched on per request."""
        if self.mode == FAST and options.speed_lora is None:
            raise ValueError("fast mode needs a step-distilled speed LoRA: set PARTICALIZE_SPEED_LORA")
        stack = LoraStack(self.pipe, strict=options.strict)
        for path, strength in options.loras:
            stack.load(path, strength)
        fuse = options.fuse
        if options.tools:  # each tool's stack is switched per run: none may be fused into the weights
            if fuse:
                raise LoraFuseRefused("cannot fuse LoRAs with a tool catalogue (each run switches to its tool's "
                                      "LoRAs, and a fused one could not be switched off): leave "
                                      "PARTICALIZE_FUSE_LORA / --fuse-lora off")
            for tool, files in options.tools:
                for path, strength in files:
                    stack.load(path, strength, tool=tool)
        elif options.loras and resolve_compile(self.speed, self.device)[0] and not fuse:
            refusal = stack.fuse_refusal()
            if refusal is None:
                log.info("fusing the LoRAs before compiling (compiled graphs should not carry adapter layers)")
                fuse = True
            else:  # fusing into float8 or GGUF weights would round the LoRA away: adapters, compiled with the rest
                self.load_notes.append("LoRAs kept unfused on the quantized transformer (fusing before compiling "
                                       "would round their change to the base's precision): adapter layers are "
                                       "compiled with it")
                log.info("%s", self.load_notes[-1])
        if fuse:  # asked for: LoraFuseRefused saying what to do when the base is quantized
            stack.fuse()
        if options.speed_lora is not None:  # after fusing: it stays an adapter, switched on per request
            stack.load(options.speed_lora[0], options.speed_lora[1], speed=True)
        return stack

    def _needs_warmup(self) -> bool:
        """Compiled blocks (compiled in the warm-up, not in the first task), or a kernel other than SDPA's or
        float8 matmuls (whose first call may fail on this GPU): checked by a run before the first task."""
        return self.applied.compiled or self.applied.attention_backend != "native" or self.applied.float8

    def _warm_up_or_fall_back(self) -> None:
        """Warm up; when the run fails, turn off the next speed option in effect (WARMUP_REVERT_ORDER: compile,
        then the attention kernel, ...), record it as a fallback and run again. An error that remains with every
        revertible option off is not theirs: it is raised (the model does not load), as is an out-of-memory."""
        pending = list(WARMUP_REVERT_ORDER)
        while True:
            try:
                self.warmup()
                return
            except OutOfMemory:  # the memory the configuration needs, not a speed option's failure (said as is)
                raise
            except Exception as exc:
                if self.speed.context_parallel != "none":  # one rank falling back alone would leave the others
                    raise                                  # waiting in a collective: every rank fails to load
                option = None
                while pending and option is None:
                    candidate = pending.pop(0)
                    if revert(self.pipe, self.applied, candidate):
                        option = candidate
                if option is None:
                    raise
                self.applied.fall_back(option, exc, when="in the warm-up")

    def warmup(self) -> None:
        """Short runs at start so that the first task does not pay for compilation: one per mode when a speed
        LoRA is loaded, and one per catalogue tool (the active adapters are guarded Python state, so each mode and
        each tool has its own compiled graphs; switching between warmed ones then compiles nothing)."""
        started = time.perf_counter()
        image = Image.new("RGB", (832, 480), (127, 127, 127))
        modes = (NORMAL, FAST) if self.lora_stack.has_speed else (None,)
        tools = sorted(self.lora_stack.tools)
        for tool in tools:
            for mode in modes:
                self.generate(GenerationParams(numFrames=9, steps=2, seed=0, mode=mode), image, tool=tool)
        self.lora_stack.use(self.mode == FAST)  # the default tool's stack again, as after loading
        log.info("warm-up: %d run(s) (%s modes x %d tools) took %.1fs", len(modes) * len(tools),
                 "normal and fast" if len(modes) > 1 else "one", len(tools), time.perf_counter() - started)

    @property
    def degraded(self) -> list[str]:
        """What runs other than configured, for /ready and the start-up lines: speed options that fell back to
        their default path, and interrupt points that could not be installed (empty: nothing)."""
        parts = []
        if self.applied.fallbacks:
            parts.append("speed option fallbacks (default path used): " + "; ".join(self.applied.fallbacks))
        if self.interrupt_points.problems:
            parts.append("interrupt: " + "; ".join(self.interrupt_points.problems))
        return parts

    @property
    def loaded_files(self) -> list[LoadedFile]:
        """The single files the transformer and text encoder came from (format, memory), for the banner and /ready."""
        found = (loaded_file_of(getattr(self.pipe, name, None)) for name in ("transformer", "text_encoder"))
        return [info for info in found if info is not None]

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

    @property
    def modes(self) -> Modes:
        """The modes this generator runs: its default, fast mode when a speed LoRA is loaded, and cached mode when
        MagCache's hooks are on (configured, and not fallen back at start)."""
        fell_back = self.speed.step_cache == "mag" and self.applied.mag is None
        return Modes(self.mode, self.fast if self.lora_stack.has_speed else None, cached=self.applied.mag is not None,
                     cached_note=" (its hooks fell back at start: see /ready)" if fell_back else "")

    def resolve(self, params: GenerationParams, image: Image.Image) -> ResolvedParams:
        """The one resolution for a caller without request limits (the CLI, a batch, the warm-up): mode, the size
        the image implies within the preset's pixel budget, seed. Parameters already resolved (the server resolves
        with its limits: pipeline.resolve) are returned as they are."""
        if isinstance(params, ResolvedParams):
            return params
        params = with_mode(params, self.modes)
        width, height = resolve_size(
            image.size, params.width, params.height, self.preset.max_area, self.size_multiple
        )
        return ResolvedParams.of(params.with_seed().model_copy(update={"width": width, "height": height}))

    def check_loras(self, files: Sequence[Path]) -> None:
        """LoraMismatch (saying why) unless each file is a LoRA for this base, every key fitting it (names and
        shapes): checked before a task with request LoRAs starts, nothing is loaded."""
        for path in files:
            check_lora_file(self.pipe.transformer, path)

    def generate(
        self,
        params: GenerationParams,
        image: Image.Image,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        interrupt: StopCheck | None = None,
        tool: str = "",
        loras: Sequence[tuple[Path, float]] = (),
    ) -> Video:
        """`_generate`, with `loras` ((file, strength) sent with this request) loaded on top of the tool's for
        this run only, then dropped: the next run is bit-equal to a fresh process's (pipeline.lora.request). A
        file that does not fit raises LoraMismatch before anything runs. Compiled, the run is eager
        (torch.compiler's force_eager stance): the adapters would change the compiled blocks' guarded modules,
        so nothing is compiled for them and the warm graphs stay as they are."""
        if not loras:
            return self._generate(params, image, progress, should_stop, interrupt, tool)
        with self._lock, request_loras(self.lora_stack, loras):
            eager = torch.compiler.set_stance("force_eager") if self.applied.compiled else nullcontext()
            with eager:
                return self._generate(params, image, progress, should_stop, interrupt, tool)

    def _generate(
        self,
        params: GenerationParams,
        image: Image.Image,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        interrupt: StopCheck | None = None,
        tool: str = "",
    ) -> Video:
        """Run one video. `should_stop` is checked after every step (it may do I/O); `interrupt` before every
        transformer block and VAE decoder call (it must be cheap, e.g. `threading.Event.is_set`). When either
        says stop, the run raises Interrupted (a run stopped in its last step never starts the VAE decode).
        Resolved parameters run as they are; others are resolved here, once (`resolve`). `tool`: whose LoRA stack
        runs ("": the default stack; another, one of `options.loras.tools`)."""
        params = self.resolve(params, image)
        if params.mode == FAST and not self.lora_stack.has_speed:  # resolved elsewhere, for a speed LoRA not here
            raise no_speed_lora(self.modes.offered)
        if params.mode == CACHED and self.applied.mag is None:  # resolved elsewhere, for hooks not on here
            raise no_step_cache(self.modes.offered, self.modes.cached_note)
        if image.mode != "RGB":  # decode_image gives RGB already: no second conversion
            image = image.convert("RGB")
        with self._lock:
            started = time.perf_counter()
            fast = params.mode == FAST
            self.lora_stack.use(fast, tool)
            self.pipe.scheduler = (self.fast_schedulers if fast else self.schedulers).for_shift(params.flow_shift)
            mag = self.applied.mag
            if mag is not None:
                mag.prepare(params.steps, "cached" if params.mode == CACHED else "exact")
            steps = {"done": 0}

            def on_step_end(pipe: object, i: int, t: object, kwargs: dict) -> dict:
                done = steps["done"] = i + 1
                if progress is not None:
                    progress(StepProgress(done, params.steps, time.perf_counter() - started))
                if (should_stop is not None and should_stop()) or (interrupt is not None and interrupt()):
                    raise Interrupted(done, params.steps)
                return {}

            self.interrupt_points.arm(interrupt)
            phase, oom, notes = "encoding the prompt", None, []
            try:
                guidance = params.scale > 1.0
                prompt_embeds, negative_embeds = self.embeddings.prompt_embeds(
                    params.prompt, params.negative_prompt, guidance, self.max_sequence_length, self.device
                )
                if self.applied.guidance_hook is not None:
                    self.applied.guidance_hook.set_negative(negative_embeds)
                phase = "denoising"
                latents = self.pipe(
                    image=image,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_embeds,
                    height=params.height,
                    width=params.width,
                    num_frames=params.num_frames,
                    num_inference_steps=params.steps,
                    guidance_scale=params.scale,
                    generator=torch.Generator(device="cpu").manual_seed(params.seed),
                    output_type="latent",
                    callback_on_step_end=on_step_end,
                    max_sequence_length=self.max_sequence_length,
                ).frames
                del prompt_embeds, negative_embeds
                phase = "decoding with the VAE"
                frames = self._decode_retrying_tiled(latents, notes)
            except BlockInterrupt:
                self._release()
                raise Interrupted(steps["done"], params.steps) from None
            except BaseException as exc:
                if not is_out_of_memory(exc):
                    self._release()
                    raise
                if phase.startswith("decoding") and notes:
                    phase += " (also when retried with VAE tiling)"
                oom = out_of_memory_message(exc, params, phase, self.device, self.applied)
            finally:
                self.interrupt_points.arm(None)
            if oom is not None:  # outside the handler: the run's tensors, held by the error's frames, are gone
                latents = None
                self._release()
                log.warning("%s", oom)
                raise OutOfMemory(oom, phase)
            schedule = mag.schedule() if mag is not None and params.mode == CACHED else None
            if schedule is not None:
                notes.append(schedule.describe())
            return Video(frames=np.asarray(frames, dtype=np.float32), params=params,
                         timings={"generate": time.perf_counter() - started}, notes=notes, schedule=schedule)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents to (F, H, W, 3) frames in [0, 1], as WanImageToVideoPipeline.__call__ decodes them (the same
        casts, de-normalisation, VAE decode and post-processing), so that the decode can be retried alone."""
        from diffusers.utils.torch_utils import get_module_execution_device

        vae = self.pipe.vae
        latents = latents.to(device=get_module_execution_device(vae), dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / latents_std + latents_mean, return_dict=False)[0]
        video = self.pipe.video_processor.postprocess_video(video, output_type="np")
        self.pipe.maybe_free_model_hooks()
        return video[0]

    def _decode_retrying_tiled(self, latents: torch.Tensor, notes: list[str]) -> np.ndarray:
        """Decode; out of memory with tiling off, once more with VAE tiling (then tiling is put back as it was).
        The retry decodes the same latents: nothing is denoised again."""
        vae = self.pipe.vae
        tiled = bool(getattr(vae, "use_tiling", False))
        try:
            return self.decode(latents)
        except Exception as exc:
            if tiled or not is_out_of_memory(exc):
                raise
        self._release()  # outside the handler: the failed decode's tensors are freed first
        log.warning("out of memory in the VAE decode; decoding again with VAE tiling")
        notes.append("the VAE decode ran out of memory and was retried with VAE tiling "
                     "(PARTICALIZE_VAE_TILING=1 decodes tiled from the start)")
        vae.enable_tiling()
        try:
            return self.decode(latents)
        finally:
            vae.disable_tiling()

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
