"""Speed and memory options, each applied with diffusers' own machinery and each reported as applied or not.

Order matters and is fixed here: LoRA fused (the loader) → attention backend → fused QKV → float8 → step cache →
batched guidance → memory mode → text encoder placement → VAE tiling → context parallelism → compile.
Fusing the LoRA and the QKV projections before float8 means the quantized weights are the final ones (an unfused
LoRA stays in bf16 on top of float8 base layers); compiling last means the compiled graphs see the final modules.

A speed option never takes the worker down: any error while enabling one (a library release renaming an internal
name, a kernel that does not load, torchao refusing a layer) undoes what that option had done so far, leaves that
option on its default path (SDPA attention, separate projections, plain weights, no cache, two guidance forwards,
everything placed on the device, no VAE tiling, eager blocks), is logged once as a warning and is listed in
`Applied.fallbacks` (shown in /ready and at start). The warm-up (pipeline.generator) reverts options in
`WARMUP_REVERT_ORDER` when its run fails. Context parallelism is the exception: its ranks must agree, so a failure
there stays an error (one rank falling back alone would leave the others waiting in their collectives). If an undo
itself fails the model is in no known state: that is raised (SpeedOptionBroken), never served.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import WanImageToVideoPipeline

from pipeline.speed import fa4
from pipeline.speed.compile_cache import CompileCache, cache_key
from pipeline.speed.guidance import BatchedGuidanceHook, disable_batched_guidance, enable_batched_guidance
from pipeline.speed.step_cache_mag import MagCalibration, MagSettings, MagStepCache
from pipeline.weight_files.quantized_layers import is_quantized_linear, quantized_layers

log = logging.getLogger(__name__)

AttentionChoice = str
StepCache = Literal["none", "first_block", "taylorseer", "mag"]
MemoryMode = Literal["none", "model_cpu_offload", "group_offload", "sequential_cpu_offload"]

# Tried in this order by "auto" on CUDA, exact kernels only: FlashAttention-4 (local wheel; Hopper/Blackwell),
# FA3 (Hopper), then PyTorch SDPA (cuDNN attention on Hopper). FA2 ("flash") and SageAttention ("sage", int8:
# approximate) were measured slower than SDPA's own pick on an H200 (shared/notes/h200-measurements.md): they
# stay available by name, but auto never picks them.
AUTO_CUDA_BACKENDS = ("flash_4", "_flash_3", "native")
# The per-block sub-modules whose outputs TaylorSeer predicts between full computations.
WAN_BLOCK_OUTPUTS = (r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn")


@dataclass(frozen=True)
class SpeedOptions:
    attention_backend: AttentionChoice = "auto"
    compile: bool | None = None
    """None: on where it pays (CUDA, no offload), resolved by `resolve_compile`."""
    compile_dynamic: bool = True
    compile_mode: str | None = None
    compile_cache_dir: Path | None = None
    """Where compiled artifacts persist across restarts (None: no persistent cache)."""
    fuse_qkv: bool = False
    text_encoder_on_cpu: bool = False
    cfg_batch: bool = False
    step_cache: StepCache = "none"
    step_cache_threshold: float = 0.05
    step_cache_interval: int = 3
    mag: MagSettings = MagSettings()
    """step_cache "mag": the decision rule's settings and an optional calibration file
    (pipeline.speed.step_cache_mag)."""
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
    fused_qkv: bool = False
    text_encoder_on_cpu: bool = False
    attention_max_abs_error: float | None = None
    """|kernel - SDPA| on random inputs, for kernels checked before use (FlashAttention-4)."""
    guidance_hook: BatchedGuidanceHook | None = None
    mag: MagStepCache | None = None
    """The MagCache hooks (step_cache "mag"), set per run by the generator: exact, cached or calibrating."""
    fallbacks: list[str] = field(default_factory=list)
    """Speed options that failed (while enabling or in the warm-up) and run their default path instead, each
    "<option> (<when>): <error type>: <message>"."""

    def note(self, message: str) -> None:
        log.info(message)
        self.notes.append(message)

    def fall_back(self, option: str, exc: BaseException, when: str = "while enabling") -> None:
        """Record (and log once, as a warning) that `option` failed and its default path is used instead."""
        message = f"{option} ({when}): {type(exc).__name__}: {str(exc)[:300]}"
        log.warning("speed option fell back to its default path: %s", message)
        self.fallbacks.append(message)


class SpeedOptionBroken(RuntimeError):
    """A speed option failed and undoing what it had done failed too: the model is in no known state."""


def guarded(applied: Applied, option: str, enable: Callable[[], object], undo: Callable[[], object]) -> bool:
    """Run `enable`; on any error run `undo` (back to the option's default path) and record the fallback.
    True when the option took effect."""
    try:
        enable()
    except Exception as exc:
        try:
            undo()
        except Exception as undo_error:
            raise SpeedOptionBroken(f"{option} failed ({type(exc).__name__}: {exc}) and could not be undone "
                                    f"({type(undo_error).__name__}: {undo_error})") from exc
        applied.fall_back(option, exc)
        return False
    return True


def _try_backend(transformer: torch.nn.Module, name: str) -> str | None:
    """Set the backend if its kernels are importable here; the reason it is not, otherwise."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
        transformer.set_attention_backend(name)
    except (RuntimeError, ValueError, ImportError) as exc:
        return str(exc).split(". ")[0]
    return None


def choose_attention(pipe: WanImageToVideoPipeline, requested: str, device: torch.device, applied: Applied,
                     context_parallel: str = "none") -> None:
    """The first usable backend of the request ("auto": the fastest exact one here). A backend that is merely not
    available here is a note; an error while setting one (e.g. diffusers renaming what FA4 relies on) resets every
    processor to diffusers' default (SDPA) and is a fallback. Under context parallelism an error is raised: every
    rank must run the same kernel, and one falling back alone would leave the others waiting."""
    try:
        _choose_attention(pipe, requested, device, applied, context_parallel)
    except Exception as exc:
        if context_parallel != "none":
            raise
        reset_attention(pipe, applied)
        applied.fall_back(f"attention backend {requested!r}", exc)


def reset_attention(pipe: WanImageToVideoPipeline, applied: Applied) -> None:
    """Back to diffusers' default attention (PyTorch SDPA) on every processor."""
    pipe.transformer.reset_attention_backend()
    applied.attention_backend = "native"
    applied.attention_max_abs_error = None


def _choose_attention(pipe: WanImageToVideoPipeline, requested: str, device: torch.device, applied: Applied,
                      context_parallel: str) -> None:
    candidates = [requested]
    if requested == "auto":
        candidates = list(AUTO_CUDA_BACKENDS) if device.type == "cuda" else ["native"]
        if context_parallel != "none" and device.type == "cuda":  # diffusers refuses FA4 and FA3 there
            from pipeline.speed.context_parallel import AUTO_CP_BACKENDS

            candidates = list(AUTO_CP_BACKENDS[context_parallel])
            applied.note(f"attention auto under context parallelism ({context_parallel}): trying "
                         f"{', '.join(candidates)} (diffusers allows no FlashAttention-4/FA3 there)")
    elif device.type != "cuda" and requested not in ("native", "_native_math", "flex", fa4.NAME):
        applied.note(f"attention backend {requested!r} needs CUDA; using 'native' (PyTorch SDPA) on {device.type}")
        candidates = ["native"]
    for name in candidates:
        if name == fa4.NAME:
            reason, error = fa4.try_enable(pipe.transformer, device)
            applied.attention_max_abs_error = error
            if reason is None:
                applied.attention_backend = name
                applied.note(f"attention backend: {name} (local FlashAttention-4; max |FA4 - SDPA| {error:.1e})")
                return
            applied.note(f"attention backend {name!r} unavailable: {reason}")
            continue
        reason = _try_backend(pipe.transformer, name)
        if reason is None:
            applied.attention_backend = name
            applied.note(f"attention backend: {name}")
            return
        applied.note(f"attention backend {name!r} unavailable: {reason}")
    if context_parallel == "ring":
        raise ValueError("ring attention needs an attention backend that returns the log-sum-exp and none of "
                         f"{', '.join(candidates)} could be set here; use --context-parallel ulysses")
    reason = _try_backend(pipe.transformer, "native")
    if reason is not None:
        raise RuntimeError(f"not even the 'native' attention backend could be set: {reason}")
    applied.attention_backend = "native"
    applied.note("attention backend: native (fallback)")


def float8_unsupported(device: torch.device) -> str | None:
    """Why float8 matmuls cannot run on `device`, or None."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "float8 weights need a CUDA GPU with compute capability >= 8.9 (Ada/Hopper); not applied"
    return None


def apply_float8(
    pipe: WanImageToVideoPipeline, device: torch.device, applied: Applied, keep: Collection[str] = ()
) -> None:
    """`keep`: parameters an unfused LoRA switches by a full difference (pipeline.lora.diffs rewrites them in
    place per request): their Linear layers stay in bf16, since a float8 weight cannot take that copy.

    Guarded twice: a copy of the first layer is quantized and run first (torchao's config, its hardware check and
    a float8 matmul, with the model untouched), and each layer's original weights are kept while torchao walks the
    model (Float8Undo) so that a failure half way puts every layer back as it was.
    """
    reason = float8_unsupported(device)
    if reason is not None:
        applied.note(reason)
        return
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
    except ImportError:
        applied.note("float8 weights need torchao (`pip install torchao`); not applied")
        return
    keep = frozenset(keep)
    undo = Float8Undo(pipe.transformer, device)

    def quantize() -> None:
        _float8_probe(pipe.transformer, keep, quantize_, Float8DynamicActivationFloat8WeightConfig)
        quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig(),
                  filter_fn=undo.saving(functools.partial(float8_filter, keep=keep)))

    if not guarded(applied, "float8", quantize, undo.restore):
        return
    undo.forget()
    applied.float8 = True
    lora = any("lora_" in name for name, _ in pipe.transformer.named_modules())
    kept = sum(1 for fqn, m in pipe.transformer.named_modules() if _switched_linear(m, fqn, keep))
    applied.note("transformer weights quantized to float8 (torchao, dynamic activations)"
                 + ("; the unfused LoRA stays in bf16 on top" if lora else "")
                 + (f"; {kept} Linear layers kept in bf16 (a switched LoRA difference rewrites their weights)"
                    if kept else ""))


def _float8_probe(transformer: torch.nn.Module, keep: frozenset[str], quantize_: Callable, config: Callable) -> None:
    """Quantize a copy of the first layer torchao would take and run it: what fails for every layer fails here,
    before the model is touched."""
    import copy

    for fqn, module in transformer.named_modules():
        if float8_filter(module, fqn, keep):
            probe = copy.deepcopy(module)
            quantize_(probe, config())
            weight = module.weight
            with torch.no_grad():
                probe(torch.zeros(16, module.in_features, dtype=weight.dtype, device=weight.device))
            return


class Float8Undo:
    """The original weights of the layers torchao has quantized so far, to put back if it fails half way.

    Kept where they are (no copy) when the device has room for the float8 copies next to them, else copied to
    the CPU as torchao reaches each layer (the GPU frees each bf16 weight as torchao replaces it, as without
    this guard). Forgotten once quantization has succeeded.
    """

    def __init__(self, transformer: torch.nn.Module, device: torch.device) -> None:
        self.transformer = transformer
        self.saved: dict[str, tuple[torch.nn.Module, dict[str, torch.nn.Parameter], dict[str, torch.Tensor]]] = {}
        """fqn -> (the layer, its original parameters, their CPU copies when the originals are not kept)."""
        self.to_cpu = False
        if device.type == "cuda":
            needed = sum(m.weight.numel() for m in transformer.modules() if isinstance(m, torch.nn.Linear))
            self.to_cpu = torch.cuda.mem_get_info(device)[0] < needed + (2 << 30)  # float8: a byte a weight

    def saving(self, filter_fn: Callable[[torch.nn.Module, str], bool]) -> Callable[[torch.nn.Module, str], bool]:
        """`filter_fn`, recording each layer it lets torchao quantize (torchao asks it just before)."""

        def filter_and_save(module: torch.nn.Module, fqn: str) -> bool:
            if not filter_fn(module, fqn):
                return False
            params = {n: p for n, p in module.named_parameters(recurse=False)}
            copies = {n: p.detach().to("cpu", copy=True) for n, p in params.items()} if self.to_cpu else {}
            self.saved[fqn] = (module, {} if self.to_cpu else params, copies)
            if self.to_cpu:  # keep only what is needed to rebuild them: their device, dtype and flags
                self.saved[fqn][1].update({n: torch.nn.Parameter(p.new_empty(0), p.requires_grad)
                                           for n, p in params.items()})
            return True

        return filter_and_save

    def restore(self) -> None:
        """Every layer as it was before quantization (also the module object, where torchao replaced it)."""
        for fqn, (module, params, copies) in self.saved.items():
            parent_name, _, name = fqn.rpartition(".")
            parent = self.transformer.get_submodule(parent_name) if parent_name else self.transformer
            if getattr(parent, name) is not module:
                setattr(parent, name, module)
            for pname, param in params.items():
                if pname in copies:
                    param = torch.nn.Parameter(copies[pname].to(param.device), param.requires_grad)
                setattr(module, pname, param)
            module.__dict__.pop("extra_repr", None)  # torchao's per-instance repr of a quantized layer
        self.saved.clear()

    def forget(self) -> None:
        self.saved.clear()


def float8_filter(module: torch.nn.Module, fqn: str, keep: Collection[str] = frozenset()) -> bool:
    """Which layers torchao quantizes: the base linears whose sizes float8 matmuls take (multiples of 16).

    An unfused LoRA's small lora_A/lora_B (rank-sized) stay in bf16: PEFT adds them on top of the float8 base.
    The separate projections that fused QKV left as views of the fused weights are not used: left as they are.
    A Linear whose weight is in `keep` (switched per request by a LoRA difference) stays in bf16. A layer a float8
    or GGUF transformer file already holds quantized is left as it is.
    """
    if not isinstance(module, torch.nn.Linear) or "lora_" in fqn or _switched_linear(module, fqn, keep):
        return False
    if is_quantized_linear(module):
        return False
    if module.weight._base is not None:  # a view into a fused QKV layer (apply_fuse_qkv): unused, keep it a view
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _switched_linear(module: torch.nn.Module, fqn: str, keep: Collection[str]) -> bool:
    """A Linear (or PEFT's base_layer of one) whose weight a switchable LoRA difference rewrites."""
    owner = fqn.removesuffix(".base_layer")
    return isinstance(module, torch.nn.Linear) and "lora_" not in fqn and f"{owner}.weight" in keep


def apply_fuse_qkv(pipe: WanImageToVideoPipeline, applied: Applied) -> None:
    """One matmul for q, k, v (and k, v of the cross-attentions) with diffusers' own fusion: exact.

    Not with an unfused LoRA (its adapters sit on the separate projections). diffusers keeps the separate
    layers (for unfusing) with weights of their own, 14 GB more on the 14B model: they are made views into the
    fused weights instead, so fusing costs no memory.
    """
    if any("lora_" in name for name, _ in pipe.transformer.named_modules()):
        applied.note("fused QKV projections not applied: an unfused LoRA sits on the separate projections")
        return
    if quantized_layers(pipe.transformer):
        applied.note("fused QKV projections not applied: the transformer file's q/k/v weights are held quantized "
                     "(float8 or GGUF), which diffusers' fusion cannot concatenate")
        return
    pipe.transformer.fuse_qkv_projections()
    for module in pipe.transformer.modules():
        if getattr(module, "fused_projections", False):
            _share_fused(module, "to_qkv", ("to_q", "to_k", "to_v"))
            _share_fused(module, "to_kv", ("to_k", "to_v"))
            _share_fused(module, "to_added_kv", ("add_k_proj", "add_v_proj"))
    applied.fused_qkv = True
    applied.note("QKV projections fused (diffusers fuse_qkv_projections; the separate layers share its weights)")


def _share_fused(module: torch.nn.Module, fused_name: str, part_names: tuple[str, ...]) -> None:
    """Point each separate projection's weight and bias at its rows of the fused layer (views, no copies)."""
    fused = getattr(module, fused_name, None)
    if fused is None:
        return
    start = 0
    for name in part_names:
        part = getattr(module, name)
        rows = slice(start, start + part.out_features)
        part.weight = torch.nn.Parameter(fused.weight.data[rows], requires_grad=False)
        if part.bias is not None:
            part.bias = torch.nn.Parameter(fused.bias.data[rows], requires_grad=False)
        start += part.out_features


def apply_text_encoder_on_cpu(pipe: WanImageToVideoPipeline, device: torch.device, applied: Applied) -> None:
    """Keep UMT5-XXL (11 GB in bf16) off the GPU: prompts are encoded on the CPU and cached (pipeline.embeddings).

    A new prompt then costs a CPU encode (seconds; device_check measures it). Embeddings equal the GPU's up to
    the rounding differences of CPU and GPU bf16 kernels.
    """
    pipe.text_encoder.to("cpu")
    applied.text_encoder_on_cpu = True
    applied.note(f"text encoder on the CPU (prompt embeddings computed there, then moved to {device.type})")


def step_cache_config(options: SpeedOptions) -> object:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if options.step_cache == "first_block":
        return FirstBlockCacheConfig(threshold=options.step_cache_threshold)
    # diffusers' default patterns ("^blocks.*attn", fullmatch) miss Wan's "blocks.N.attn1": name them.
    return TaylorSeerCacheConfig(cache_interval=options.step_cache_interval, cache_identifiers=list(WAN_BLOCK_OUTPUTS))


def apply_step_cache(pipe: WanImageToVideoPipeline, options: SpeedOptions, applied: Applied,
                     config: object | None = None, calibration: MagCalibration | None = None) -> None:
    if options.step_cache == "mag":
        applied.mag = MagStepCache(pipe.transformer, calibration, options.mag)
        applied.step_cache = "mag"
        source = calibration.short_source if calibration is not None else "none (calibration runs only)"
        applied.note(f"step cache: mag (diffusers MagCache hooks; threshold {options.mag.threshold:g}, K "
                     f"{options.mag.max_skip_steps}, retention {options.mag.retention_ratio:g}; calibration: {source})")
        return
    pipe.transformer.enable_cache(config if config is not None else step_cache_config(options))
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
    """Regional compilation: each repeated transformer block once, not the whole model (fast to compile). Under
    MagCache's hooks (compiler-disabled: a compiled block around them would run eager) the blocks' own forwards are
    compiled instead (pipeline.speed.step_cache_mag).

    With dynamic shapes, duck sizing would tie dimensions that merely happened to be equal in the warm-up
    run (e.g. latent frames == a rotary table dim) and force a recompile on the next size: turn it off.
    """
    if options.compile_dynamic:
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
    if applied.mag is not None:
        applied.mag.compile(fullgraph=True, dynamic=options.compile_dynamic, mode=options.compile_mode)
    else:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=options.compile_dynamic,
                                                 mode=options.compile_mode)
    applied.compiled = True
    applied.note(f"transformer blocks compiled (dynamic={options.compile_dynamic}, mode={options.compile_mode})")


GRAPHS_PER_STACK = 8
"""The compiled graphs dynamo keeps per function for one adapter stack: the default of
`torch._dynamo.config.recompile_limit` (torch 2.13; `cache_size_limit`, its name before 2.6, is an alias). Past the
limit a function runs eagerly from then on, with one warning."""


def allow_graphs(stacks: int) -> int:
    """Room for the compiled graphs of `stacks` adapter stacks (catalogue tools x modes): PEFT's active adapters are
    guarded state, so each stack has graphs of its own (one per function on the tiny model, dynamic shapes), and
    each keeps the room one stack had by default (GRAPHS_PER_STACK, for other guards such as static sizes). The
    limits are the process's: raised, never lowered. Returns the per-function limit in effect."""
    import torch._dynamo.config as dynamo_config

    needed = GRAPHS_PER_STACK * max(1, stacks)
    if dynamo_config.recompile_limit < needed:
        log.info("compile: %d adapter stacks (tools x modes): dynamo's recompile_limit raised from %d to %d",
                 stacks, dynamo_config.recompile_limit, needed)
        dynamo_config.recompile_limit = needed
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, needed)
    return dynamo_config.recompile_limit


def resolve_compile(options: SpeedOptions, device: torch.device) -> tuple[bool, str | None]:
    """Compile or not, and why when the default (None) decides: on CUDA it is the fastest exact option
    (2.89 vs 3.35 s a forward on an H200); off on the CPU (where 20+ s of compilation rarely pays) and with
    offload or context parallelism (hooks that move weights mid-forward)."""
    if options.compile is not None:
        return options.compile, None
    if device.type != "cuda":
        return False, f"compile off by default on {device.type} (PARTICALIZE_COMPILE=1 to force)"
    if options.memory_mode != "none" or options.context_parallel != "none":
        return False, "compile off by default with offload or context parallelism (PARTICALIZE_COMPILE=1 to force)"
    return True, "compile on by default on CUDA (--no-compile or PARTICALIZE_COMPILE=0 to opt out)"


def compile_cache_for(
    pipe: WanImageToVideoPipeline, options: SpeedOptions, applied: Applied, device: torch.device
) -> CompileCache | None:
    """The persistent compile cache of this configuration (None when off or nothing is compiled)."""
    if not applied.compiled or options.compile_cache_dir is None:
        return None
    graph_options = {
        "compile_dynamic": options.compile_dynamic,
        "compile_mode": options.compile_mode,
        "attention_backend": applied.attention_backend,
        "float8": applied.float8,
        "fused_qkv": applied.fused_qkv,
        "step_cache": applied.step_cache,
        "cfg_batch": applied.guidance_hook is not None,
        # an unfused (speed) LoRA's adapter layers are in the compiled graphs: their ranks are their shapes
        "lora_adapter_ranks": sorted({r for m in pipe.transformer.modules() for r in getattr(m, "r", {}).values()}),
    }
    return CompileCache(Path(options.compile_cache_dir), cache_key(pipe.transformer, device, graph_options))


def apply_speed_options(
    pipe: WanImageToVideoPipeline, options: SpeedOptions, device: torch.device, float8_keep: Collection[str] = (),
    mag_calibration: MagCalibration | None = None,
) -> Applied:
    """`float8_keep`: parameters switched in place per request (see apply_float8). `mag_calibration`: the ratios of
    step_cache "mag" (found by the generator before loading)."""
    applied = Applied()
    choose_attention(pipe, options.attention_backend, device, applied, options.context_parallel)
    if options.fuse_qkv:
        guarded(applied, "fused QKV", lambda: apply_fuse_qkv(pipe, applied), lambda: unfuse_qkv(pipe, applied))
    if options.float8:
        apply_float8(pipe, device, applied, float8_keep)
    if options.step_cache != "none":
        _guard_step_cache(pipe, options, applied, mag_calibration)
    if options.cfg_batch:
        if options.step_cache != "none":
            applied.note("batched guidance not applied: step caches keep cond and uncond state apart")
        else:
            guarded(applied, "batched guidance", lambda: _batch_guidance(pipe, applied),
                    lambda: unbatch_guidance(pipe, applied))
    if options.memory_mode != "none":
        guarded(applied, f"memory mode {options.memory_mode}",
                lambda: apply_memory_mode(pipe, options.memory_mode, device, applied),
                lambda: undo_memory_mode(pipe, device, applied))
    if options.text_encoder_on_cpu:
        if options.memory_mode != "none" and applied.memory_mode != "none":
            applied.note(f"text encoder placement left to memory mode {options.memory_mode}")
        else:
            guarded(applied, "text encoder on the CPU", lambda: apply_text_encoder_on_cpu(pipe, device, applied),
                    lambda: pipe.text_encoder.to(device))
    if options.vae_tiling:
        guarded(applied, "VAE tiling", lambda: _tile_vae(pipe, applied), lambda: untile_vae(pipe, applied))
    if options.context_parallel != "none":
        from pipeline.speed.context_parallel import enable_context_parallel

        degree = enable_context_parallel(pipe, options.context_parallel, device)
        applied.note(f"context parallelism: {options.context_parallel} over {degree} processes")
    compile_, why = resolve_compile(options, device)
    if why:
        applied.note(why)
    if compile_:
        guarded(applied, "compile", lambda: apply_compile(pipe, options, applied), lambda: uncompile(pipe, applied))
    return applied


def _guard_step_cache(pipe: WanImageToVideoPipeline, options: SpeedOptions, applied: Applied,
                      mag_calibration: MagCalibration | None = None) -> None:
    """The config is built inside the guard (a renamed parameter fails there) and kept for the undo."""
    built: list[object] = []

    def enable() -> None:
        if options.step_cache == "mag":  # MagStepCache builds diffusers' configs itself
            apply_step_cache(pipe, options, applied, calibration=mag_calibration)
            return
        built.append(step_cache_config(options))
        apply_step_cache(pipe, options, applied, built[0])

    guarded(applied, f"step cache {options.step_cache}", enable,
            lambda: remove_step_cache(pipe, applied, built[0] if built else None))


def _batch_guidance(pipe: WanImageToVideoPipeline, applied: Applied) -> None:
    applied.guidance_hook = enable_batched_guidance(pipe.transformer)
    applied.note("classifier-free guidance batched: cond and uncond in one forward")


def unbatch_guidance(pipe: WanImageToVideoPipeline, applied: Applied) -> None:
    disable_batched_guidance(pipe.transformer)
    applied.guidance_hook = None


def _tile_vae(pipe: WanImageToVideoPipeline, applied: Applied) -> None:
    pipe.vae.enable_tiling()
    applied.vae_tiling = True
    applied.note("VAE tiling on")


def untile_vae(pipe: WanImageToVideoPipeline, applied: Applied) -> None:
    pipe.vae.disable_tiling()
    applied.vae_tiling = False


def unfuse_qkv(pipe: WanImageToVideoPipeline, applied: Applied) -> None:
    """Back to the separate projections, also from a fusion that stopped half way (a module holding a fused layer
    diffusers had not yet marked fused). The separate layers keep their weights (views of the fused rows when
    `_share_fused` ran: the same values)."""
    from diffusers.models.attention import AttentionModuleMixin

    for module in pipe.transformer.modules():
        if isinstance(module, AttentionModuleMixin) and any(hasattr(module, n) for n in FUSED_LAYERS):
            module.fused_projections = True  # so that diffusers' unfuse removes whatever it had added
            module.unfuse_projections()
    applied.fused_qkv = False


FUSED_LAYERS = ("to_qkv", "to_kv", "to_added_kv")


def remove_step_cache(pipe: WanImageToVideoPipeline, applied: Applied, config: object | None = None) -> None:
    """Remove the step cache's hooks, also those of an `enable_cache` (of `config`) that stopped before recording
    its config on the model."""
    transformer = pipe.transformer
    if applied.mag is not None:
        applied.compiled = applied.compiled and not applied.mag.compiled  # its compiled forwards go with it
        applied.mag.remove()
        applied.mag = None
    if transformer._cache_config is None and config is not None:
        transformer._cache_config = config  # diffusers' disable_cache removes the hooks of the recorded config
    if transformer._cache_config is not None:
        transformer.disable_cache()
    applied.step_cache = "none"


def undo_memory_mode(pipe: WanImageToVideoPipeline, device: torch.device, applied: Applied) -> None:
    """Remove every offload hook (accelerate's model/sequential ones, diffusers' group offloading) and place the
    whole pipeline on the device, as with memory mode "none"."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    pipe.remove_all_hooks()
    for name in ("transformer", "text_encoder"):
        module = getattr(pipe, name)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        for hook in (_LAZY_PREFETCH_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _GROUP_OFFLOADING):
            registry.remove_hook(hook, recurse=True)
    pipe.to(device)
    applied.memory_mode = "none"


def uncompile(pipe: WanImageToVideoPipeline, applied: Applied) -> None:
    """Undo `compile_repeated_blocks`: `nn.Module.compile` keeps the compiled call in `_compiled_call_impl`
    (None: the module's own forward runs)."""
    for module in pipe.transformer.modules():
        if module._compiled_call_impl is not None:
            module._compiled_call_impl = None
    if applied.mag is not None:
        applied.mag.uncompile()
    applied.compiled = False


WARMUP_REVERT_ORDER = ("compile", "attention", "batched guidance", "step cache", "fused QKV", "VAE tiling")
"""What a failing warm-up turns off, one at a time in this order, until its run works: the options that change the
code a forward runs. float8 is checked on a copy of one layer before the model is quantized (apply_float8) and is
not reverted later (that would need a second copy of the weights); memory mode and the text encoder's placement
are not reverted either (placing everything on the GPU is what they avoid)."""


def revert(pipe: WanImageToVideoPipeline, applied: Applied, option: str) -> bool:
    """Turn `option` off (its default path from now on); False when it is not in effect."""
    if option == "compile" and applied.compiled:
        uncompile(pipe, applied)
    elif option == "attention" and applied.attention_backend != "native":
        reset_attention(pipe, applied)
    elif option == "batched guidance" and applied.guidance_hook is not None:
        unbatch_guidance(pipe, applied)
    elif option == "step cache" and applied.step_cache != "none":
        remove_step_cache(pipe, applied)
    elif option == "fused QKV" and applied.fused_qkv:
        unfuse_qkv(pipe, applied)
    elif option == "VAE tiling" and applied.vae_tiling:
        untile_vae(pipe, applied)
    else:
        return False
    return True
