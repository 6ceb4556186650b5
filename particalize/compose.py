"""The composition root of the model side: the pipeline's and the weights' options, built once from the settings.

Each layer below owns its options as typed objects and never sees the settings; this module is the one place
that knows which setting feeds which option. Nothing here imports torch at module level: the API side composes
its limits from here too (particalize.compose_server), and an API-only replica never loads the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from particalize.settings import Settings
from pipeline.fast import FastMode
from pipeline.params import Limits, model_max_area
from pipeline.resolve import Modes
from weights.locate import LoraSources
from weights.lora_sources import parse_lora_list, parse_lora_source

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.generator import GeneratorOptions, VideoGenerator
    from pipeline.lora.stack import LoraStackOptions
    from pipeline.speed.acceleration import SpeedOptions
    from pipeline.weight_files.files import WeightFiles
    from weights.single_file import FileSource

WEIGHT_FILE_SETTINGS = {"transformer": ("transformer_file", "PARTICALIZE_TRANSFORMER_FILE", "--transformer-file"),
                        "text_encoder": ("text_encoder_file", "PARTICALIZE_TEXT_ENCODER_FILE", "--text-encoder-file")}
"""Pipeline component -> (setting, its variable, its flag) of the single weight files (issue 18)."""


def limits(settings: Settings) -> Limits:
    """The operator limits of a request (Run, the CLI's flags, a batch row)."""
    return Limits(
        max_num_frames=settings.max_num_frames,
        max_steps=settings.max_steps,
        max_side=settings.max_side,
        max_pixels=settings.max_pixels,
        max_work=settings.max_work,
        max_area=model_max_area(settings.model, settings.model_max_area),
        fast_mode=bool(settings.speed_lora),
        cached_mode=settings.step_cache == "mag",
    )


def modes(settings: Settings) -> Modes:
    """The modes the workers run, as the API process resolves a Run with them: the default, fast mode with a speed
    LoRA, cached mode with the MagCache step cache (a worker whose hooks fell back at start refuses it itself)."""
    return Modes(settings.mode, fast_mode(settings) if settings.speed_lora else None,
                 cached=settings.step_cache == "mag")


def fast_mode(settings: Settings) -> FastMode:
    return FastMode(settings.fast_steps, settings.fast_scale, settings.fast_flow_shift)


def lora_sources(settings: Settings) -> LoraSources:
    return LoraSources(
        weights_dir=settings.weights_dir,
        lora_path=settings.lora_path,
        lora_repo=settings.lora_repo,
        lora_file=settings.lora_file,
        lora_revision=settings.lora_revision,
        lora_strength=settings.lora_strength,
        loras=tuple(parse_lora_list(settings.loras, settings.lora_strength)),
        speed_lora=parse_lora_source(settings.speed_lora) if settings.speed_lora else None,
        require_lora=settings.require_lora,
    )


def weight_file_sources(settings: Settings) -> dict[str, FileSource]:
    """The single weight files configured, by the component they replace, as written (local or hub)."""
    from weights.single_file import parse_file_source

    return {role: parse_file_source(getattr(settings, name)) for role, (name, _, _) in WEIGHT_FILE_SETTINGS.items()
            if getattr(settings, name)}


def weight_files(settings: Settings) -> WeightFiles:
    """The configured weight files as local paths; WeightsMissing naming the setting, and for a hub file the command
    that fetches it, when one is not on disk (loading never reaches a hub)."""
    from pipeline.errors import WeightsMissing
    from pipeline.weight_files.files import WeightFiles
    from weights.single_file import source_path

    paths = {}
    for role, source in weight_file_sources(settings).items():
        _, variable, flag = WEIGHT_FILE_SETTINGS[role]
        path = source_path(source, settings.weights_dir)
        if not path.is_file():
            if source.is_hub:
                raise WeightsMissing(f"{role.replace('_', ' ')} file {source.text} ({variable}) is not on disk at "
                                     f"{path}: fetch it with `particalize weights fetch --skip-model {flag} "
                                     f"{source.text}` (on a machine that reaches huggingface.co; then copy "
                                     f"{settings.weights_dir / 'files'} here)")
            raise WeightsMissing(f"{variable} / {flag} names {path}, which is not a file: give the path of the "
                                 f"{role.replace('_', ' ')} .safetensors or .gguf file")
        paths[role] = path
    return WeightFiles(**paths)


def speed_options(settings: Settings) -> SpeedOptions:
    from pipeline.speed.acceleration import SpeedOptions
    from pipeline.speed.step_cache_mag import MagSettings

    return SpeedOptions(
        attention_backend=settings.attention_backend,
        compile=settings.compile,
        compile_dynamic=settings.compile_dynamic,
        compile_mode=settings.compile_mode,
        cfg_batch=settings.cfg_batch,
        step_cache=settings.step_cache,
        step_cache_threshold=settings.step_cache_threshold,
        step_cache_interval=settings.step_cache_interval,
        mag=MagSettings(threshold=settings.mag_threshold, max_skip_steps=settings.mag_max_skip_steps,
                        retention_ratio=settings.mag_retention_ratio, calibration=settings.mag_calibration),
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


def lora_stack(settings: Settings) -> LoraStackOptions:
    """The configured LoRAs as files on disk; WeightsMissing naming the setting of one that is not there."""
    from particalize.tools import tool_set
    from pipeline.lora.stack import LoraStackOptions
    from server.tool_info import DEFAULT_SLUG
    from weights.locate import lora_source_file, speed_lora_file, stack_files

    sources = lora_sources(settings)
    speed = speed_lora_file(sources)
    tools = tool_set(settings)

    def files(slug: str) -> tuple[tuple[Path, float], ...]:
        return tuple((lora_source_file(s, settings.weights_dir, f"{slug}'s loras"), s.strength)
                     for s in tools.loras[slug])

    stack = ([(path, source.strength) for source, path in stack_files(sources)] if tools.default_from_settings
             else files(DEFAULT_SLUG))
    return LoraStackOptions(
        loras=tuple(stack),
        tools=tuple((slug, files(slug)) for slug in tools.loras if slug != DEFAULT_SLUG),
        speed_lora=(speed[1], speed[0].strength) if speed is not None else None,
        fuse=settings.fuse_lora,
        strict=settings.lora_strict,
    )


def generator_options(settings: Settings) -> GeneratorOptions:
    """What the warm generator the settings describe is built from (model preset, LoRAs, fast mode, device)."""
    from pipeline.generator import GeneratorOptions
    from pipeline.presets import get_preset

    return GeneratorOptions(
        preset=get_preset(settings.model, max_area=settings.model_max_area),
        weights_dir=settings.weights_dir,
        device=settings.device,
        random_weights=settings.random_weights,
        weight_files=weight_files(settings),
        loras=lora_stack(settings),
        speed=speed_options(settings),
        fast=fast_mode(settings),
        mode=settings.mode,
        memory_check=settings.memory_check,
    )


def make_generator(settings: Settings) -> VideoGenerator:
    """Load the model the settings describe (seconds to minutes)."""
    from pipeline.generator import VideoGenerator

    return VideoGenerator(generator_options(settings))


def parallel_refusal(settings: Settings) -> str | None:
    """Why the context parallelism the settings ask for cannot run here (checked before any weights are read)."""
    if settings.context_parallel == "none":
        if settings.parallel_degree > 1:
            return (f"--parallel-degree {settings.parallel_degree} splits one video with context parallelism: set "
                    "--context-parallel ulysses (PARTICALIZE_CONTEXT_PARALLEL) too")
        return None
    if settings.step_cache == "mag":
        from pipeline.speed.step_cache_mag import refusal

        return refusal(settings.context_parallel)
    import torch

    from pipeline.devices import pick_device
    from pipeline.parallel.group import model_heads, parallel_refusal
    from pipeline.presets import get_preset

    device = pick_device(settings.device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    heads = model_heads(get_preset(settings.model), settings.weights_dir)
    return parallel_refusal(settings.context_parallel, settings.parallel_degree, heads, device.type, gpus,
                            settings.attention_backend)
