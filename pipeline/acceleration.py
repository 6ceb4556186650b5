"""Speed and memory options, each applied with diffusers' own machinery and each reported as applied or not.

Order matters and is fixed here: LoRA fused (the loader) → attention backend → float8 → step cache →
batched guidance → memory mode → VAE tiling → context parallelism → compile. Compiling last means the
compiled graphs see the final modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers import WanImageToVideoPipeline

from pipeline.guidance import BatchedGuidanceHook, enable_batched_guidance

log = logging.getLogger(__name__)

AttentionChoice = str
StepCache = Literal["none", "first_block", "taylorseer"]
MemoryMode = Literal["none", "model_cpu_offload", "group_offload", "sequential_cpu_offload"]

# Tried in this order by "auto" on CUDA: FA3 (Hopper), FA2, SageAttention, then PyTorch SDPA.
AUTO_CUDA_BACKENDS = ("_flash_3", "flash", "sage", "native")
# The per-block sub-modules whose outputs TaylorSeer predicts between full computations.
WAN_BLOCK_OUTPUTS = (r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn")


@dataclass(frozen=True)
class SpeedOptions:
    attention_backend: AttentionChoice = "auto"
    compile: bool = False
    compile_dynamic: bool = True
    compile_mode: str | None = None
    cfg_batch: bool = False
    step_cache: StepCache = "none"
    step_cache_threshold: float = 0.05
    step_cache_interval: int = 3
    memory_mode: MemoryMode = "none"
    vae_tiling: bool = False
    float8: bool = False
    encode_cache_size: int = 16
    context_parallel: Literal["none", "ring", "ulysses"] = "none"


@dataclass
class Applied:
    """What actually took effect, and why anything requested did not: logged at start and in /ready."""

    attention_backend: str = "native"
    notes: list[str] = field(default_factory=list)
    compiled: bool = False
    step_cache: str = "none"
    memory_mode: str = "none"
    vae_tiling: bool = False
    float8: bool = False
    guidance_hook: BatchedGuidanceHook | None = None

    def note(self, message: str) -> None:
        log.info(message)
        self.notes.append(message)


def _try_backend(transformer: torch.nn.Module, name: str) -> str | None:
    """Set the backend if its kernels are importable here; the reason it is not, otherwise."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
        transformer.set_attention_backend(name)
    except (RuntimeError, ValueError, ImportError) as exc:
        return str(exc).split(". ")[0]
    return None


def choose_attention(pipe: WanImageToVideoPipeline, requested: str, device: torch.device, applied: Applied) -> None:
    candidates = [requested]
    if requested == "auto":
        candidates = list(AUTO_CUDA_BACKENDS) if device.type == "cuda" else ["native"]
    elif device.type != "cuda" and requested not in ("native", "_native_math", "flex"):
        applied.note(f"attention backend {requested!r} needs CUDA; using 'native' (PyTorch SDPA) on {device.type}")
        candidates = ["native"]
    for name in candidates:
        reason = _try_backend(pipe.transformer, name)
        if reason is None:
            applied.attention_backend = name
            applied.note(f"attention backend: {name}")
            return
        applied.note(f"attention backend {name!r} unavailable: {reason}")
    if _try_backend(pipe.transformer, "native") is None:
        applied.attention_backend = "native"
        applied.note("attention backend: native (fallback)")


def apply_float8(pipe: WanImageToVideoPipeline, device: torch.device, applied: Applied) -> None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        applied.note("float8 weights need a CUDA GPU with compute capability >= 8.9 (Ada/Hopper); not applied")
        return
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
    except ImportError:
        applied.note("float8 weights need torchao (`pip install torchao`); not applied")
        return
    quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig())
    applied.float8 = True
    applied.note("transformer weights quantized to float8 (torchao, dynamic activations)")


def apply_step_cache(pipe: WanImageToVideoPipeline, options: SpeedOptions, applied: Applied) -> None:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if options.step_cache == "first_block":
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=options.step_cache_threshold))
    elif options.step_cache == "taylorseer":
        # diffusers' default patterns ("^blocks.*attn", fullmatch) miss Wan's "blocks.N.attn1": name them.
        pipe.transformer.enable_cache(
            TaylorSeerCacheConfig(cache_interval=options.step_cache_interval, cache_identifiers=list(WAN_BLOCK_OUTPUTS))
        )
    applied.step_cache = options.step_cache
    applied.note(f"step cache: {options.step_cache}")


def apply_memory_mode(pipe: WanImageToVideoPipeline, mode: MemoryMode, device: torch.device, applied: Applied) -> None:
    if mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode == "group_offload":
        use_stream = device.type == "cuda"
        for name in ("transformer", "text_encoder"):
            module = getattr(pipe, name)
            if hasattr(module, "enable_group_offload"):
                module.enable_group_offload(onload_device=device, offload_type="leaf_level", use_stream=use_stream)
            else:
                from diffusers.hooks import apply_group_offloading

                apply_group_offloading(module, onload_device=device, offload_type="leaf_level", use_stream=use_stream)
        pipe.vae.to(device)
        pipe.image_encoder.to(device)
    applied.memory_mode = mode
    applied.note(f"memory mode: {mode}")


def apply_compile(pipe: WanImageToVideoPipeline, options: SpeedOptions, applied: Applied) -> None:
    """Regional compilation: each repeated transformer block once, not the whole model (fast to compile).

    With dynamic shapes, duck sizing would tie dimensions that merely happened to be equal in the warm-up
    run (e.g. latent frames == a rotary table dim) and force a recompile on the next size: turn it off.
    """
    if options.compile_dynamic:
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
    pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=options.compile_dynamic, mode=options.compile_mode)
    applied.compiled = True
    applied.note(f"transformer blocks compiled (dynamic={options.compile_dynamic}, mode={options.compile_mode})")


def apply_speed_options(pipe: WanImageToVideoPipeline, options: SpeedOptions, device: torch.device) -> Applied:
    applied = Applied()
    choose_attention(pipe, options.attention_backend, device, applied)
    if options.float8:
        apply_float8(pipe, device, applied)
    if options.step_cache != "none":
        apply_step_cache(pipe, options, applied)
    if options.cfg_batch:
        if options.step_cache != "none":
            applied.note("batched guidance not applied: step caches keep cond and uncond state apart")
        else:
            applied.guidance_hook = enable_batched_guidance(pipe.transformer)
            applied.note("classifier-free guidance batched: cond and uncond in one forward")
    if options.memory_mode != "none":
        apply_memory_mode(pipe, options.memory_mode, device, applied)
    if options.vae_tiling:
        pipe.vae.enable_tiling()
        applied.vae_tiling = True
        applied.note("VAE tiling on")
    if options.context_parallel != "none":
        from pipeline.parallel import enable_context_parallel

        degree = enable_context_parallel(pipe, options.context_parallel, device)
        applied.note(f"context parallelism: {options.context_parallel} over {degree} processes")
    if options.compile:
        apply_compile(pipe, options, applied)
    return applied
