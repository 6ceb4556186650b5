"""The library names the code relies on beyond documented API: one test per name, its id the dotted name.

diffusers, torch, peft and transformers are used past their public surface: underscore names (diffusers'
hub-kernel registry, `torch._dynamo` counters, PEFT's base-layer dtype lookup), modules that are not their package's
API (`diffusers.hooks`, `diffusers.models.attention_dispatch`, `diffusers.loaders.single_file_utils`), attributes read
or written on library objects (an attention processor's `_attention_backend`, a pipeline's `_interrupt`, GGUF
parameters' `quant_type`), and library methods overridden (`torch.nn.Module._apply`, the flow-match scheduler's
`set_timesteps`). Public names that arrived late are here too, as lower bounds of the ranges in pyproject.toml
(`AttentionBackendName.FLASH_4_HUB`: diffusers 0.38; `ContextParallelConfig`, `TaylorSeerCacheConfig`: 0.36;
`_get_base_layer_device_and_dtype` honouring `compute_dtype`: peft 0.19; UMT5's tied embedding: transformers 5.3).
The floors themselves are the oldest releases on which the suite passes (docs/library-versions.md).

Each check asserts what the code needs of the name (its kind, the parameters the code passes, the behaviour it
counts on) on tiny objects, so that an upgrade that breaks one fails here, under that name, before it fails
somewhere in a video. `test_every_internal_import_of_the_code_has_a_contract` keeps the list complete: an import
of a private or non-API module of these libraries anywhere in the code or tests needs an entry here.

When a check fails after an upgrade: read what the code does with the name (the `used` text of its entry), adapt
the code (or this check, when only the check's way of observing it changed), and move the range in pyproject.toml.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("pipeline", "server", "weights", "particalize", "benchmarks", "scripts", "tests")


@dataclass(frozen=True)
class Contract:
    check: Callable[[], None]
    used: str
    """Where and how the code uses the name (shown when the check fails)."""
    needs: str | None = None
    """An optional package (an extra) without which the name cannot be used, nor checked."""


CONTRACTS: dict[str, Contract] = {}


def contract(name: str, used: str, needs: str | None = None) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(check: Callable[[], None]) -> Callable[[], None]:
        assert name not in CONTRACTS, f"two contracts for {name}"
        CONTRACTS[name] = Contract(check, used, needs)
        return check

    return register


def takes(function: object, *names: str) -> None:
    """`function` accepts each of `names` as a keyword (by name, not through **kwargs)."""
    params = inspect.signature(function).parameters
    missing = [n for n in names if n not in params
               or params[n].kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    assert not missing, f"{getattr(function, '__qualname__', function)} takes no keyword {missing}: {list(params)}"


def source_says(obj: object, *snippets: str) -> None:
    """The source of `obj` contains each snippet: for behaviour that only the library's own code path shows."""
    text = inspect.getsource(obj)
    missing = [s for s in snippets if s not in text]
    assert not missing, f"{getattr(obj, '__qualname__', obj)} no longer contains {missing}"


# ---- tiny models, built here (no project module: they move, the libraries' names are what is tested) ----

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=16, added_kv_proj_dim=24, rope_max_seq_len=1024)


def tiny_transformer() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY_WAN).eval()


def tiny_inputs() -> dict[str, torch.Tensor]:
    """One forward's keywords, as WanImageToVideoPipeline passes them."""
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 36, 1, 4, 4, generator=generator), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, 16, generator=generator),
                encoder_hidden_states_image=torch.randn(1, 4, 16, generator=generator), return_dict=False)


def tiny_umt5() -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    # tie_word_embeddings=False as in UMT5-XXL's config (pipeline/random_weights.py, the real snapshot)
    return UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0, tie_word_embeddings=False)).eval()


# ============================== diffusers: names that set the floor ==============================

@contract("diffusers.models.attention_dispatch.AttentionBackendName.FLASH_4_HUB",
          "pipeline/speed/fa4.py routes the local FlashAttention-4 kernel through diffusers' flash_4_hub entry (0.38+)")
def _():
    from diffusers.models.attention_dispatch import AttentionBackendName

    assert AttentionBackendName.FLASH_4_HUB.value == "flash_4_hub"


@contract("diffusers.ContextParallelConfig",
          "pipeline/speed/context_parallel.py: ContextParallelConfig(ring_degree=N) or (ulysses_degree=N), then "
          "enable_parallelism")
def _():
    from diffusers import ContextParallelConfig

    takes(ContextParallelConfig, "ring_degree", "ulysses_degree")


@contract("diffusers.TaylorSeerCacheConfig",
          "pipeline/speed/acceleration.py step_cache=taylorseer: TaylorSeerCacheConfig(cache_interval, "
          "cache_identifiers)")
def _():
    from diffusers import TaylorSeerCacheConfig

    takes(TaylorSeerCacheConfig, "cache_interval", "cache_identifiers")


@contract("diffusers.FirstBlockCacheConfig", "pipeline/speed/acceleration.py step_cache=first_block: (threshold=)")
def _():
    from diffusers import FirstBlockCacheConfig

    takes(FirstBlockCacheConfig, "threshold")


@contract("diffusers.ModelMixin.enable_parallelism",
          "pipeline/speed/context_parallel.py: transformer.enable_parallelism(config=)")
def _():
    from diffusers import ModelMixin

    takes(ModelMixin.enable_parallelism, "config")


@contract("diffusers.ModelMixin._resolve_parallel_config",
          "pipeline/speed/context_parallel.py _cpu_as_one_device: enable_parallelism places rank r on device "
          "`r % torch.accelerator.device_count()` (0 on the CPU, a ZeroDivisionError); on the CPU the count is "
          "reported as 1 during that call, so gloo ranks run on the one CPU")
def _():
    from diffusers import ModelMixin

    source_says(ModelMixin._resolve_parallel_config, "torch.accelerator.device_count()",
                "torch._C._get_accelerator().type")
    source_says(ModelMixin.enable_parallelism, "self._resolve_parallel_config(config)")


@contract("diffusers.models.attention_dispatch._AttentionBackendRegistry._supports_context_parallel",
          "pipeline/speed/context_parallel.py CP_BACKENDS and LSE_BACKENDS: the backends refused or accepted "
          "at start under "
          "context parallelism (diffusers raises later, at enable_parallelism or the first forward)")
def _():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from pipeline.speed.context_parallel import CP_BACKENDS, LSE_BACKENDS

    supported = set(_AttentionBackendRegistry._supports_context_parallel)
    assert supported >= CP_BACKENDS, sorted(CP_BACKENDS - supported)
    assert "native" in supported and "_flash_3" not in supported and "flash_4" not in supported, sorted(supported)
    assert LSE_BACKENDS <= CP_BACKENDS


# ============================== diffusers: attention dispatch ==============================

@contract("diffusers.models.attention_dispatch.AttentionBackendName",
          "attention_backend values (settings, acceleration.AUTO_CUDA_BACKENDS, benchmarks/bench_attention.py "
          "KERNELS) are looked up by value: AttentionBackendName(name)")
def _():
    from diffusers.models.attention_dispatch import AttentionBackendName

    for value in ("native", "_native_math", "_native_cudnn", "_native_flash", "_native_efficient", "flex",
                  "flash", "_flash_3", "sage", "flash_4_hub"):
        assert AttentionBackendName(value).value == value


@contract("diffusers.models.attention_dispatch._check_attention_backend_requirements",
          "pipeline/speed/acceleration.py _try_backend: raises RuntimeError/ValueError/ImportError when a backend's "
          "kernels are not importable (the note shows its first sentence); passes for native")
def _():
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    takes(_check_attention_backend_requirements, "backend")
    _check_attention_backend_requirements(AttentionBackendName.NATIVE)
    if importlib.util.find_spec("flash_attn_interface") is None:
        with pytest.raises((RuntimeError, ValueError, ImportError)):
            _check_attention_backend_requirements(AttentionBackendName._FLASH_3)


@contract("diffusers.models.attention_dispatch._HUB_KERNELS_REGISTRY",
          "pipeline/speed/fa4.py enable, benchmarks/bench_attention.py: "
          "_HUB_KERNELS_REGISTRY[FLASH_4_HUB].kernel_fn is "
          "replaced by the local kernel, which diffusers' flash_4_hub function then calls with keywords q, k, v, "
          "softmax_scale, causal (returning out or (out, lse))")
def _():
    from diffusers.models.attention_dispatch import (
        _HUB_KERNELS_REGISTRY,
        AttentionBackendName,
        dispatch_attention_fn,
    )

    entry = _HUB_KERNELS_REGISTRY[AttentionBackendName.FLASH_4_HUB]
    assert hasattr(entry, "kernel_fn")
    seen = {}

    def kernel(**kwargs):
        seen.update(kwargs)
        q, k, v = (kwargs[n].transpose(1, 2) for n in "qkv")
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=kwargs["softmax_scale"])
        return out.transpose(1, 2), None

    before = entry.kernel_fn
    entry.kernel_fn = kernel
    try:
        q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
        out = dispatch_attention_fn(q, k, v, backend=AttentionBackendName.FLASH_4_HUB)
    finally:
        entry.kernel_fn = before
    assert set(seen) >= {"q", "k", "v", "softmax_scale", "causal"}, sorted(seen)
    assert out.shape == q.shape


@contract("diffusers.models.attention_dispatch.dispatch_attention_fn",
          "benchmarks/bench_attention.py and tests: dispatch_attention_fn(q, k, v, backend=AttentionBackendName)")
def _():
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    takes(dispatch_attention_fn, "query", "key", "value", "backend")
    q = torch.randn(1, 8, 2, 4)
    torch.testing.assert_close(dispatch_attention_fn(q, q, q, backend=AttentionBackendName.NATIVE),
                               torch.nn.functional.scaled_dot_product_attention(*[q.transpose(1, 2)] * 3
                                                                                ).transpose(1, 2))


@contract("diffusers.models.attention.AttentionModuleMixin",
          "pipeline/speed/fa4.py enable: the modules whose processor gets the backend are the "
          "AttentionModuleMixin ones")
def _():
    from diffusers.models.attention import AttentionModuleMixin

    attention = [m for m in tiny_transformer().modules() if isinstance(m, AttentionModuleMixin)]
    assert len(attention) == 2 * TINY_WAN["num_layers"]  # attn1 and attn2 of every block


@contract("diffusers.models.transformers.transformer_wan.WanAttnProcessor._attention_backend",
          "pipeline/speed/fa4.py enable sets processor._attention_backend directly (as set_attention_backend does, "
          "without its `kernels` check); the processor passes it to dispatch_attention_fn(backend=)")
def _():
    from diffusers.models.attention_dispatch import AttentionBackendName

    transformer = tiny_transformer()
    processor = transformer.blocks[0].attn1.processor
    assert hasattr(processor, "_attention_backend")
    transformer.set_attention_backend("_native_math")
    assert processor._attention_backend == AttentionBackendName._NATIVE_MATH
    source_says(type(processor).__call__, "backend=self._attention_backend")


@contract("diffusers.ModelMixin.set_attention_backend",
          "pipeline/speed/acceleration.py _try_backend: transformer.set_attention_backend(name)")
def _():
    from diffusers import ModelMixin

    takes(ModelMixin.set_attention_backend, "backend")


# ============================== diffusers: hooks ==============================

@contract("diffusers.hooks.ModelHook",
          "pipeline/speed/guidance.py BatchedGuidanceHook: a stateful ModelHook (_is_stateful, reset_state) whose "
          "new_forward calls self.fn_ref.original_forward")
def _():
    from diffusers.hooks import HookRegistry, ModelHook

    resets = []

    class Doubling(ModelHook):
        _is_stateful = True

        def new_forward(self, module, *args, **kwargs):
            return self.fn_ref.original_forward(*args, **kwargs) * 2

        def reset_state(self, module):
            resets.append(module)
            return module

    layer = torch.nn.Linear(2, 2)
    x = torch.randn(1, 2)
    expected = layer(x) * 2
    HookRegistry.check_if_exists_or_initialize(layer).register_hook(Doubling(), "contract_doubling")
    torch.testing.assert_close(layer(x), expected)
    HookRegistry.check_if_exists_or_initialize(layer).reset_stateful_hooks()
    assert resets == [layer]


@contract("diffusers.hooks.HookRegistry",
          "pipeline/speed/guidance.py: "
          "HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, name)")
def _():
    from diffusers.hooks import HookRegistry

    takes(HookRegistry.register_hook, "hook", "name")
    layer = torch.nn.Linear(2, 2)
    registry = HookRegistry.check_if_exists_or_initialize(layer)
    assert HookRegistry.check_if_exists_or_initialize(layer) is registry


@contract("diffusers.hooks.apply_group_offloading",
          "pipeline/speed/acceleration.py memory_mode=group_offload for a module without enable_group_offload "
          "(the text encoder): apply_group_offloading(module, onload_device=, offload_type=, use_stream=)")
def _():
    from diffusers.hooks import apply_group_offloading

    takes(apply_group_offloading, "module", "onload_device", "offload_type", "use_stream")


@contract("diffusers.ModelMixin.enable_group_offload",
          "pipeline/speed/acceleration.py memory_mode=group_offload: enable_group_offload(onload_device=, "
          "offload_type=, "
          "use_stream=)")
def _():
    from diffusers import ModelMixin

    takes(ModelMixin.enable_group_offload, "onload_device", "offload_type", "use_stream")


@contract("diffusers.models.cache_utils.CacheMixin._reset_stateful_cache",
          "pipeline/generator.py _release: after an interrupted run, if transformer.is_cache_enabled, "
          "transformer._reset_stateful_cache() (a step cache must not carry a killed run's state)")
def _():
    from diffusers import FirstBlockCacheConfig

    transformer = tiny_transformer()
    assert transformer.is_cache_enabled is False
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    assert transformer.is_cache_enabled is True
    transformer._reset_stateful_cache()


@contract("diffusers.hooks.taylorseer_cache.TaylorSeerCacheConfig.cache_identifiers",
          "pipeline/speed/acceleration.py WAN_BLOCK_OUTPUTS: fullmatch patterns naming Wan's blocks.N.attn1/attn2/ffn "
          "(diffusers' defaults miss them): each named module gets a hook")
def _():
    from diffusers import TaylorSeerCacheConfig
    from diffusers.hooks import HookRegistry

    transformer = tiny_transformer()
    patterns = [r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn"]
    transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=3, cache_identifiers=patterns))
    for name in ("attn1", "attn2", "ffn"):
        module = getattr(transformer.blocks[1], name)
        assert HookRegistry.check_if_exists_or_initialize(module).hooks, f"blocks.1.{name} has no cache hook"


# ============================== diffusers: the Wan model and pipeline ==============================

@contract("diffusers.WanTransformer3DModel.blocks",
          "pipeline/interrupt.py: transformer.blocks is an nn.ModuleList the forward walks in Python (for block in "
          "self.blocks); its class is swapped for one whose __iter__ checks for a kill before each block")
def _():
    transformer = tiny_transformer()
    assert type(transformer.blocks) is torch.nn.ModuleList
    entered = []

    class Counting(torch.nn.ModuleList):
        def __iter__(self):
            for block in super().__iter__():
                entered.append(block)
                yield block

    transformer.blocks.__class__ = Counting
    with torch.no_grad():
        transformer(**tiny_inputs())
    assert len(entered) == TINY_WAN["num_layers"]


@contract("diffusers.WanTransformer3DModel.forward",
          "pipeline/speed/guidance.py: the pipeline calls the transformer with keywords hidden_states, timestep, "
          "encoder_hidden_states, encoder_hidden_states_image, return_dict=False; the hook batches them")
def _():
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    takes(WanTransformer3DModel.forward, "hidden_states", "timestep", "encoder_hidden_states",
          "encoder_hidden_states_image", "return_dict")
    source_says(WanImageToVideoPipeline.__call__, "encoder_hidden_states_image=", "return_dict=False")
    with torch.no_grad():
        out = tiny_transformer()(**tiny_inputs())
    assert isinstance(out, tuple) and out[0].shape == (1, 16, 1, 4, 4)


@contract("diffusers.WanTransformer3DModel._repeated_blocks",
          "pipeline/speed/acceleration.py apply_compile: compile_repeated_blocks(fullgraph=, dynamic=, mode=) compiles "
          "each WanTransformerBlock")
def _():
    from diffusers import WanTransformer3DModel

    assert "WanTransformerBlock" in WanTransformer3DModel._repeated_blocks
    tiny_transformer().compile_repeated_blocks(fullgraph=True, dynamic=True, mode=None)  # lazy: nothing compiles yet


@contract("diffusers.WanTransformer3DModel._keep_in_fp32_modules",
          "pipeline/weight_files/transformer_file.py (issue 18): a transformer file's tensors under these "
          "module names stay "
          "float32, as from_pretrained keeps them")
def _():
    from diffusers import WanTransformer3DModel

    names = WanTransformer3DModel._keep_in_fp32_modules
    assert isinstance(names, list) and names and all(isinstance(n, str) for n in names)
    transformer = tiny_transformer()
    segments = {s for n, _ in [*transformer.named_parameters(), *transformer.named_buffers()] for s in n.split(".")}
    segments |= {s for n, _ in transformer.named_modules() for s in n.split(".")}
    assert not set(names) - segments, f"no module named {sorted(set(names) - segments)}"


@contract("diffusers.models.transformers.transformer_wan.WanAttention.fused_projections",
          "pipeline/speed/acceleration.py apply_fuse_qkv: after fuse_qkv_projections, modules with fused_projections "
          "have to_qkv (self-attention) or to_kv and to_added_kv (cross-attention), whose rows are q|k|v, k|v, "
          "add_k_proj|add_v_proj")
def _():
    transformer = tiny_transformer()
    transformer.fuse_qkv_projections()
    attn1, attn2 = transformer.blocks[0].attn1, transformer.blocks[0].attn2
    assert attn1.fused_projections and attn2.fused_projections
    for fused, parts in ((attn1.to_qkv, (attn1.to_q, attn1.to_k, attn1.to_v)), (attn2.to_kv, (attn2.to_k, attn2.to_v)),
                         (attn2.to_added_kv, (attn2.add_k_proj, attn2.add_v_proj))):
        torch.testing.assert_close(fused.weight, torch.cat([p.weight for p in parts]))


@contract("diffusers.models.transformers.transformer_wan.WanAttention.unfuse_projections",
          "pipeline/speed/acceleration.py unfuse_qkv (a fused-QKV fallback or warm-up revert): "
          "fused_projections set True "
          "on a module holding to_qkv/to_kv/to_added_kv, then unfuse_projections() removes them and clears it")
def _():
    transformer = tiny_transformer()
    expected = transformer(**tiny_inputs())[0]
    transformer.blocks[0].attn1.fuse_projections()
    attn2 = transformer.blocks[0].attn2
    attn2.fuse_projections()
    attn2.fused_projections = False  # as a fusion stopped before diffusers marked it fused
    for module in (transformer.blocks[0].attn1, attn2):
        module.fused_projections = True
        module.unfuse_projections()
        assert not module.fused_projections
        assert not any(hasattr(module, n) for n in ("to_qkv", "to_kv", "to_added_kv"))
    torch.testing.assert_close(transformer(**tiny_inputs())[0], expected)


@contract("diffusers.ModelMixin.reset_attention_backend",
          "pipeline/speed/acceleration.py choose_attention/reset_attention: an attention fallback sets every "
          "processor's "
          "_attention_backend back to None (diffusers' default: SDPA)")
def _():
    transformer = tiny_transformer()
    transformer.set_attention_backend("_native_math")
    transformer.reset_attention_backend()
    assert {m.processor._attention_backend for m in transformer.modules() if hasattr(m, "processor")
            and hasattr(m.processor, "_attention_backend")} == {None}


@contract("diffusers.hooks.MagCacheConfig",
          "pipeline/speed/step_cache_mag.py mag_config: MagCacheConfig(threshold, max_skip_steps, retention_ratio, "
          "num_inference_steps, mag_ratios) interpolates mag_ratios to num_inference_steps (nearest) when built; "
          "calibrate=True needs no ratios; enable_cache takes it")
def _():
    from diffusers.hooks import MagCacheConfig

    takes(MagCacheConfig, "threshold", "max_skip_steps", "retention_ratio", "num_inference_steps", "mag_ratios",
          "calibrate")
    config = MagCacheConfig(num_inference_steps=3, mag_ratios=[1.0, 0.9, 0.8, 0.7, 0.6])
    assert [round(float(r), 3) for r in config.mag_ratios] == [1.0, 0.8, 0.6]
    MagCacheConfig(calibrate=True, num_inference_steps=4)
    tiny_transformer().enable_cache(config)


@contract("diffusers.hooks.mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK",
          "pipeline/speed/step_cache_mag.py: the head hook's name, under which the per-pass subclass replaces it (and "
          "disable_cache removes it)")
@contract("diffusers.hooks.mag_cache._MAG_CACHE_BLOCK_HOOK",
          "pipeline/speed/step_cache_mag.py: the other blocks' hooks' name (the tail one replaced by a capturing "
          "subclass)")
@contract("diffusers.hooks.mag_cache.MagCacheHeadHook",
          "pipeline/speed/step_cache_mag.py _PerPassHeadHook: MagCacheHeadHook(state_manager, config), "
          "compiler-disabled new_forward deciding with self.config (read per call) and leaving state.should_compute; "
          "state_manager._context.name is the pipeline's cache_context name")
@contract("diffusers.hooks.mag_cache.MagCacheBlockHook",
          "pipeline/speed/step_cache_mag.py: MagCacheBlockHook(state_manager, is_tail=, config=), .is_tail, "
          ".config read per call (num_inference_steps, calibrate), _perform_calibration_step(state, residual) "
          "appending to state.calibration_ratios; fn_ref.original_forward, the block's own forward, compiled under "
          "the hooks")
def _():
    from diffusers.hooks import HookRegistry, MagCacheConfig
    from diffusers.hooks.mag_cache import (
        _MAG_CACHE_BLOCK_HOOK,
        _MAG_CACHE_LEADER_BLOCK_HOOK,
        MagCacheBlockHook,
        MagCacheHeadHook,
    )

    takes(MagCacheHeadHook, "state_manager", "config")
    takes(MagCacheBlockHook, "state_manager", "is_tail", "config")
    takes(MagCacheBlockHook._perform_calibration_step, "state", "current_residual")
    source_says(MagCacheHeadHook.new_forward, "self.config.mag_ratios", "state.should_compute = should_compute",
                "self.config.retention_ratio", "self.config.max_skip_steps")
    source_says(MagCacheHeadHook, "@torch.compiler.disable")  # why the blocks' own forwards are compiled instead
    transformer = tiny_transformer()
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=3))
    head = transformer.blocks[0]._diffusers_hook.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK)
    tail = transformer.blocks[1]._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK)
    assert isinstance(head, MagCacheHeadHook) and isinstance(tail, MagCacheBlockHook) and tail.is_tail
    assert head.state_manager is tail.state_manager
    assert tail.fn_ref.original_forward.__self__ is transformer.blocks[1]
    for step in range(2):
        with transformer.cache_context("cond"):
            assert head.state_manager._context.name == "cond"
            transformer(**tiny_inputs())
            state = head.state_manager.get_state()
            assert state.should_compute and len(state.calibration_ratios) == step + 1
    transformer.disable_cache()
    assert not transformer.blocks[0]._diffusers_hook.hooks and not transformer.blocks[1]._diffusers_hook.hooks
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


@contract("diffusers.WanImageToVideoPipeline.__call__.cache_context",
          "pipeline/speed/step_cache_mag.py PASSES: the pipeline wraps its guidance passes in "
          "cache_context('cond') and cache_context('uncond'); per-pass ratios are chosen by those names")
def _():
    from diffusers import WanImageToVideoPipeline

    source_says(WanImageToVideoPipeline.__call__, 'cache_context("cond")', 'cache_context("uncond")')


@contract("diffusers.models.cache_utils.CacheMixin._cache_config",
          "pipeline/speed/acceleration.py remove_step_cache: enable_cache records its config last; an enable "
          "that failed "
          "before that gets it set so that disable_cache removes the hooks it had registered")
def _():
    from diffusers import FirstBlockCacheConfig
    from diffusers.hooks import apply_first_block_cache

    transformer = tiny_transformer()
    assert transformer._cache_config is None
    config = FirstBlockCacheConfig(threshold=0.05)
    apply_first_block_cache(transformer, config)  # what enable_cache does before recording the config
    transformer._cache_config = config
    transformer.disable_cache()
    assert transformer._cache_config is None and not transformer.is_cache_enabled
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in transformer.modules())


@contract("diffusers.hooks.group_offloading._LAYER_EXECUTION_TRACKER",
          "pipeline/speed/acceleration.py undo_memory_mode: removed with the other group offloading hooks (below)")
@contract("diffusers.hooks.group_offloading._LAZY_PREFETCH_GROUP_OFFLOADING",
          "pipeline/speed/acceleration.py undo_memory_mode: removed with the other group offloading hooks (below)")
@contract("diffusers.hooks.group_offloading._GROUP_OFFLOADING",
          "pipeline/speed/acceleration.py undo_memory_mode: the hook names of group offloading (_GROUP_OFFLOADING, "
          "_LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING), removed with HookRegistry.remove_hook")
def _():
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
        _is_group_offload_enabled,
    )

    transformer = tiny_transformer()
    transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
    assert _is_group_offload_enabled(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in (_LAZY_PREFETCH_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)
    assert not _is_group_offload_enabled(transformer)
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in transformer.modules())


@contract("diffusers.DiffusionPipeline.remove_all_hooks",
          "pipeline/speed/acceleration.py undo_memory_mode: removes accelerate's model/sequential offload hooks")
def _():
    from diffusers import DiffusionPipeline

    assert callable(DiffusionPipeline.remove_all_hooks)
    source_says(DiffusionPipeline.remove_all_hooks, "remove_hook_from_module")


@contract("torch.nn.Module._compiled_call_impl",
          "pipeline/speed/acceleration.py uncompile: nn.Module.compile stores the compiled call there; None runs the "
          "module's own forward (a compile fallback or warm-up revert)")
def _():
    layer = torch.nn.Linear(2, 2)
    assert layer._compiled_call_impl is None
    layer.compile(backend="eager")
    assert layer._compiled_call_impl is not None
    layer._compiled_call_impl = None
    x = torch.randn(1, 2)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    source_says(torch.nn.Module._wrapped_call_impl, "_compiled_call_impl")


@contract("diffusers.WanImageToVideoPipeline._interrupt",
          "pipeline/generator.py _release: pipe._interrupt = False after an interrupted run; __call__ reads it")
def _():
    from diffusers import WanImageToVideoPipeline

    assert isinstance(inspect.getattr_static(WanImageToVideoPipeline, "interrupt"), property)
    source_says(WanImageToVideoPipeline.__call__, "self._interrupt")


@contract("diffusers.WanImageToVideoPipeline.__call__",
          "pipeline/generator.py generate: the keywords it passes (embeddings precomputed, a step-end callback)")
def _():
    from diffusers import WanImageToVideoPipeline

    takes(WanImageToVideoPipeline.__call__, "image", "prompt_embeds", "negative_prompt_embeds", "height", "width",
          "num_frames", "num_inference_steps", "guidance_scale", "generator", "output_type", "callback_on_step_end",
          "max_sequence_length")


@contract("diffusers.WanImageToVideoPipeline.__call__.decode",
          "pipeline/generator.py decode: output_type='latent' answers the latents as they would be decoded, and the "
          "decode is the cast to the VAE's device and dtype, the latents_mean/latents_std de-normalisation, "
          "vae.decode and video_processor.postprocess_video (redone there so that it can be retried tiled alone; "
          "tests/test_out_of_memory.py compares the frames)")
def _():
    from diffusers import WanImageToVideoPipeline

    source_says(WanImageToVideoPipeline.__call__, 'if not output_type == "latent":',
                "latents.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)",
                "latents = latents / latents_std + latents_mean", "self.vae.decode(latents, return_dict=False)[0]",
                "self.video_processor.postprocess_video(video, output_type=output_type)")


@contract("diffusers.utils.torch_utils.get_module_execution_device",
          "pipeline/generator.py decode: the device the VAE runs on (its offload hook's, else its parameters')")
def _():
    from diffusers.utils.torch_utils import get_module_execution_device

    assert get_module_execution_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


@contract("diffusers.WanImageToVideoPipeline.encode_prompt", "pipeline/embeddings.py: the keywords it passes")
def _():
    from diffusers import WanImageToVideoPipeline

    takes(WanImageToVideoPipeline.encode_prompt, "prompt", "negative_prompt", "do_classifier_free_guidance",
          "num_videos_per_prompt", "max_sequence_length", "device")


@contract("diffusers.WanImageToVideoPipeline.vae_scale_factor_spatial",
          "pipeline/generator.py size_multiple, benchmarks: vae_scale_factor_spatial and _temporal set in __init__")
def _():
    from diffusers import WanImageToVideoPipeline

    source_says(WanImageToVideoPipeline.__init__, "self.vae_scale_factor_spatial", "self.vae_scale_factor_temporal")


@contract("diffusers.WanImageToVideoPipeline.load_lora_weights",
          "pipeline/lora/stack.py LoraStack: load_lora_weights(state_dict, adapter_name=), delete_adapters, "
          "set_adapters("
          "names, adapter_weights=), enable_lora, disable_lora, fuse_lora(components=, lora_scale=, adapter_names=),"
          " unload_lora_weights")
def _():
    from diffusers import WanImageToVideoPipeline as Pipe

    takes(Pipe.load_lora_weights, "adapter_name")
    takes(Pipe.set_adapters, "adapter_names", "adapter_weights")
    takes(Pipe.fuse_lora, "components", "lora_scale", "adapter_names")
    takes(Pipe.delete_adapters, "adapter_names")
    for name in ("enable_lora", "disable_lora", "unload_lora_weights"):
        assert callable(getattr(Pipe, name)), name


@contract("diffusers.WanImageToVideoPipeline.enable_model_cpu_offload",
          "pipeline/speed/acceleration.py memory modes: enable_model_cpu_offload(device=), "
          "enable_sequential_cpu_offload(device=)")
def _():
    from diffusers import WanImageToVideoPipeline as Pipe

    takes(Pipe.enable_model_cpu_offload, "device")
    takes(Pipe.enable_sequential_cpu_offload, "device")


@contract("diffusers.AutoencoderKLWan.encoder",
          "pipeline/interrupt.py: forward pre-hooks on vae.encoder and vae.decoder (called chunk by chunk) check "
          "for a kill; acceleration: vae.enable_tiling()")
def _():
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    calls = []
    vae.encoder.register_forward_pre_hook(lambda module, args: calls.append("encoder"))
    vae.decoder.register_forward_pre_hook(lambda module, args: calls.append("decoder"))
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 1, 16, 16)).latent_dist.mode()
        vae.decode(latent)
    assert "encoder" in calls and "decoder" in calls
    assert callable(vae.enable_tiling)


@contract("diffusers.FlowMatchEulerDiscreteScheduler.set_timesteps",
          "pipeline/scheduler.py StepDistillScheduler overrides it and calls super() with num_inference_steps, "
          "device, sigmas, mu, timesteps; ShiftedSchedulers rebuilds it with from_config(shift=)")
def _():
    from diffusers import FlowMatchEulerDiscreteScheduler

    takes(FlowMatchEulerDiscreteScheduler.set_timesteps, "num_inference_steps", "device", "sigmas", "mu",
          "timesteps")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, shift=5.0)
    assert scheduler.config.shift == 5.0
    scheduler.set_timesteps(num_inference_steps=4, sigmas=[1.0, 0.75, 0.5, 0.25])
    assert len(scheduler.timesteps) == 4


@contract("diffusers.UniPCMultistepScheduler.flow_shift",
          "pipeline/tiny.py, random_weights.py, scheduler.py: UniPC with use_flow_sigmas, flow_prediction, and a "
          "per-request from_config(flow_shift=)")
def _():
    from diffusers import UniPCMultistepScheduler

    base = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=3.0)
    assert UniPCMultistepScheduler.from_config(base.config, flow_shift=5.0).config.flow_shift == 5.0


# ============================== diffusers: single files and GGUF (issue 18) ==============================

@contract("diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers",
          "pipeline/weight_files/transformer_file.py: original Wan / ComfyUI key names to diffusers names")
def _():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    original = {name: torch.zeros(1) for name in ("head.modulation", "patch_embedding.weight",
                                                  "blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k_img.weight",
                                                  "blocks.0.modulation", "blocks.0.ffn.0.weight")}
    converted = set(convert_wan_transformer_to_diffusers(dict(original)))
    expected = {"scale_shift_table", "patch_embedding.weight", "blocks.0.attn1.to_q.weight",
                "blocks.0.attn2.add_k_proj.weight", "blocks.0.scale_shift_table", "blocks.0.ffn.net.0.proj.weight"}
    assert converted == expected, sorted(converted ^ expected)


@contract("diffusers.FromOriginalModelMixin.from_single_file",
          "pipeline/weight_files/transformer_file.py _from_gguf: "
          "WanTransformer3DModel.from_single_file(state_dict, config=dir, "
          "torch_dtype=, local_files_only=True, quantization_config=GGUFQuantizationConfig(compute_dtype=))")
def _():
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    assert "dict" in next(iter(inspect.signature(WanTransformer3DModel.from_single_file).parameters))
    source_says(WanTransformer3DModel.from_single_file, '"config"', '"torch_dtype"', '"local_files_only"',
                '"quantization_config"')
    takes(GGUFQuantizationConfig, "compute_dtype")


def _write_gguf(path: Path) -> torch.Tensor:
    import gguf
    import numpy as np

    weight = np.random.RandomState(0).randn(4, 64).astype(np.float32)
    qtype = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(path), arch="wan")
    writer.add_tensor("w", gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    writer.add_tensor("b", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return torch.from_numpy(weight)


@contract("diffusers.models.model_loading_utils.load_gguf_checkpoint",
          "pipeline/weight_files/checkpoint_read.py: load_gguf_checkpoint(path) -> {name: tensor}, quantized "
          "tensors as "
          "GGUFParameter with quant_type (a gguf.GGMLQuantizationType) and quant_shape (the logical shape)")
def _():
    import tempfile

    import gguf
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    with tempfile.TemporaryDirectory() as directory:
        _write_gguf(Path(directory) / "t.gguf")
        tensors = load_gguf_checkpoint(str(Path(directory) / "t.gguf"))
    assert set(tensors) == {"w", "b"}
    assert tensors["w"].quant_type == gguf.GGMLQuantizationType.Q8_0 and tensors["w"].quant_type.name == "Q8_0"
    assert tuple(tensors["w"].quant_shape) == (4, 64)
    assert getattr(tensors["b"], "quant_type", None) is None and tensors["b"].shape == (4,)


@contract("diffusers.quantizers.gguf.utils.dequantize_gguf_tensor",
          "pipeline/weight_files/quantized_layers.py, transformer_file.py: "
          "dequantize_gguf_tensor(GGUFParameter) -> the values")
def _():
    import tempfile

    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    with tempfile.TemporaryDirectory() as directory:
        weight = _write_gguf(Path(directory) / "t.gguf")
        quantized = load_gguf_checkpoint(str(Path(directory) / "t.gguf"))["w"]
    values = dequantize_gguf_tensor(quantized)
    assert values.shape == weight.shape
    assert float((values.float() - weight).abs().max()) < 0.05  # Q8_0 rounding


@contract("diffusers.quantizers.gguf.utils.GGUFLinear.compute_dtype",
          "pipeline/weight_files/quantized_layers.py: a GGUF layer computes in module.compute_dtype (and PEFT "
          "puts a LoRA's "
          "weights in it)")
def _():
    from diffusers.quantizers.gguf.utils import GGUFLinear

    takes(GGUFLinear, "compute_dtype")
    assert GGUFLinear(64, 4, compute_dtype=torch.bfloat16).compute_dtype is torch.bfloat16


@contract("gguf.GGML_QUANT_SIZES",
          "pipeline/weight_files/memory.py (issue 18): gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.X] = "
          "(block, bytes)")
def _():
    import gguf

    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0] == (32, 34)


# ============================== torch ==============================

@contract("torch._dynamo.utils.counters",
          "pipeline/speed/compile_cache.py (counters['inductor']['fxgraph_cache_miss']: was anything compiled), "
          "benchmarks/device_check.py (counters['stats']['unique_graphs']), tests")
def _():
    from torch._dynamo.utils import counters

    assert isinstance(counters["inductor"]["fxgraph_cache_miss"], int)
    before = counters["stats"]["unique_graphs"]
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(2))
    assert counters["stats"]["unique_graphs"] > before
    source_says(importlib.import_module("torch._inductor.codecache"), '"fxgraph_cache_miss"')


@contract("torch._dynamo.reset", "benchmarks/device_check.py and tests: torch._dynamo.reset(); tests set "
          "torch._dynamo.config.error_on_recompile and call torch._dynamo.graph_break()")
def _():
    import torch._dynamo

    assert callable(torch._dynamo.reset) and callable(torch._dynamo.graph_break)
    assert isinstance(torch._dynamo.config.error_on_recompile, bool)


@contract("torch._dynamo.config.recompile_limit",
          "pipeline/speed/acceleration.py allow_graphs: the graphs kept per compiled function (8 by default, "
          "GRAPHS_PER_STACK), raised for a catalogue's tools; past it a function runs eagerly")
def _():
    import torch._dynamo
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    from pipeline.speed.acceleration import GRAPHS_PER_STACK

    assert dynamo_config._config["recompile_limit"].default == GRAPHS_PER_STACK, "its default (a generator with "\
        "tools raises the value itself for the process)"
    assert dynamo_config.cache_size_limit == dynamo_config.recompile_limit, "the old name is an alias"
    assert isinstance(dynamo_config.accumulated_recompile_limit, int)

    class Adapters:
        active = "t0"

    scale = {f"t{i}": float(i + 1) for i in range(10)}

    def graphs(limit: int) -> int:
        """Graphs compiled for one function called with 10 values of guarded Python state (as PEFT's active
        adapters are), and whether every call still gave the right answer."""
        torch._dynamo.reset()
        before = counters["stats"]["unique_graphs"]
        compiled = torch.compile(lambda x: x * scale[Adapters.active], backend="eager")
        try:
            with dynamo_config.patch(recompile_limit=limit):
                for name in scale:
                    Adapters.active = name
                    assert compiled(torch.ones(2)).tolist() == [scale[name]] * 2
        finally:
            torch._dynamo.reset()
        return counters["stats"]["unique_graphs"] - before

    assert graphs(GRAPHS_PER_STACK) == GRAPHS_PER_STACK, "past the limit, the function runs eagerly"
    assert graphs(2 * GRAPHS_PER_STACK) == 10


@contract("torch.fx.experimental._config.use_duck_shape",
          "pipeline/speed/acceleration.py apply_compile: set False with dynamic shapes (no duck sizing)")
def _():
    import torch.fx.experimental._config as fx_config

    assert isinstance(fx_config.use_duck_shape, bool)


@contract("torch._inductor.runtime.cache_dir_utils.cache_dir", "tests/test_device_check.py: the inductor cache dir")
def _():
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert isinstance(cache_dir(), str)


@contract("torch.Tensor._base", "pipeline/speed/acceleration.py float8_filter: weight._base is not None for the views "
          "that fused QKV leaves")
def _():
    whole = torch.zeros(6, 2)
    assert whole._base is None and whole[2:4]._base is whole


@contract("torch.compiler.save_cache_artifacts",
          "pipeline/speed/compile_cache.py: save_cache_artifacts() -> (bytes, info) | None; "
          "load_cache_artifacts(bytes)")
def _():
    takes(torch.compiler.load_cache_artifacts, "serialized_artifacts")
    assert callable(torch.compiler.save_cache_artifacts)


@contract("torch.library.custom_op", "pipeline/speed/fa4.py: the FA4 kernel as an opaque op "
          "(custom_op(name, mutates_args=()), .register_fake) that torch.compile does not trace into")
def _():
    takes(torch.library.custom_op, "mutates_args")

    @torch.library.custom_op("particalize_contract::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    torch.testing.assert_close(torch.ops.particalize_contract.double(torch.ones(2)), torch.full((2,), 2.0))


@contract("torch.nn.Module._apply",
          "pipeline/weight_files/quantized_layers.py Float8Linear (issue 18) overrides _apply(fn, "
          "recurse=True): .to(device) and "
          ".to(dtype) of a model reach it for each module")
def _():
    takes(torch.nn.Module._apply, "fn", "recurse")
    calls = []

    class Seen(torch.nn.Linear):
        def _apply(self, fn, recurse=True):
            calls.append(self)
            return super()._apply(fn, recurse)

    model = torch.nn.Sequential(Seen(2, 2))
    model.to(torch.float64)
    assert calls and model[0].weight.dtype == torch.float64


@contract("torch.nn.Module.set_submodule", "pipeline/weight_files/transformer_file.py, quantized_layers.py (issue 18): "
          "set_submodule(name, layer); load_state_dict(strict=False, assign=True) onto meta tensors")
def _():
    takes(torch.nn.Module.load_state_dict, "strict", "assign")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"))
    model.set_submodule("0", torch.nn.Linear(2, 3))
    assert model[0].out_features == 3
    model.load_state_dict({"0.weight": torch.ones(3, 2)}, strict=False, assign=True)
    assert not model[0].weight.is_meta


# ============================== peft ==============================

@contract("peft.tuners.tuners_utils.BaseTunerLayer._get_base_layer_device_and_dtype",
          "pipeline/weight_files/quantized_layers.py (issue 18): PEFT puts a LoRA's weights in the base "
          "layer's compute_dtype "
          "when it has one (Float8Linear, GGUFLinear), so an unfused LoRA on a quantized base is exact (peft 0.19+)")
def _():
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    takes(BaseTunerLayer._get_base_layer_device_and_dtype, "base_layer")

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8, dtype=torch.bfloat16)
            self.proj.compute_dtype = torch.float32

    model = inject_adapter_in_model(LoraConfig(target_modules=["proj"], r=2), Model())
    assert model.proj.lora_A["default"].weight.dtype == torch.float32
    assert model.proj.lora_B["default"].weight.dtype == torch.float32


@contract("peft.tuners.lora.LoraLayer.lora_A",
          "pipeline/lora/stack.py, lora_keys.py, lora_diffs.py, acceleration.py: a wrapped Linear keeps "
          "base_layer, and "
          "per adapter lora_A/lora_B (ModuleDicts of Linear), lora_alpha and r (dicts)")
def _():
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    model = inject_adapter_in_model(LoraConfig(target_modules=["0"], r=2, lora_alpha=4),
                                    torch.nn.Sequential(torch.nn.Linear(8, 4)), adapter_name="a")
    layer = model[0]
    assert isinstance(layer, LoraLayer) and isinstance(layer.base_layer, torch.nn.Linear)
    assert isinstance(layer.lora_A, torch.nn.ModuleDict) and isinstance(layer.lora_B, torch.nn.ModuleDict)
    assert layer.lora_A["a"].weight.shape == (2, 8) and layer.lora_B["a"].weight.shape == (4, 2)
    assert layer.lora_alpha["a"] == 4 and layer.r["a"] == 2
    assert "0.base_layer.weight" in dict(model.named_parameters())


@contract("peft.tuners.lora.LoraLayer.adapter_layer_names",
          "pipeline/lora/removal.py unwrap_bare_layers: after diffusers' delete_adapters removes a request LoRA, a "
          "LoraLayer whose adapter_layer_names attributes are all empty is replaced by get_base_layer() (PEFT keeps "
          "the wrapper), so the module tree is the warm model's again")
def _():
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    model = tiny_transformer()
    linear = model.blocks[0].attn1.to_q
    model.add_adapter(LoraConfig(r=2, target_modules=["blocks.0.attn1.to_q"]), adapter_name="request")
    layer = model.blocks[0].attn1.to_q
    assert isinstance(layer, LoraLayer) and layer.get_base_layer() is linear
    assert "lora_A" in layer.adapter_layer_names and layer.lora_A
    model.delete_adapters(["request"])
    assert model.blocks[0].attn1.to_q is layer  # the wrapper stays ...
    assert not any(getattr(layer, attr) for attr in layer.adapter_layer_names)  # ... holding no adapter
    assert not getattr(model, "peft_config", None)


@contract("torch.compiler.set_stance",
          "pipeline/generator.py: a run with request LoRAs on a compiled model runs under "
          "set_stance('force_eager') as a context manager: compiled functions run their Python code, compiling nothing")
def _():
    import torch._dynamo
    from torch._dynamo.utils import counters

    calls = []

    @torch.compile(backend="eager")
    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * 2

    torch._dynamo.reset()
    counters.clear()
    with torch.compiler.set_stance("force_eager"):
        assert torch.equal(double(torch.ones(2)), torch.full((2,), 2.0))
    assert calls == [1] and counters["stats"]["unique_graphs"] == 0
    torch._dynamo.reset()


@contract("peft.tuners.tuners_utils.BaseTuner.__init__",
          "pipeline/lora/stack.py filters the warning 'Already found a `peft_config` attribute' for a second adapter")
def _():
    from peft.tuners.tuners_utils import BaseTuner

    source_says(BaseTuner.__init__, "Already found a `peft_config` attribute")


# ============================== transformers ==============================

@contract("transformers.PreTrainedModel.dtype",
          "pipeline/weight_files/text_encoder_file.py (issue 18): a model's dtype is its first floating "
          "parameter's (the shared "
          "embedding), so that one stays in the compute dtype when Linear weights are float8")
def _():
    model = tiny_umt5()
    model.shared.to(torch.float16)
    assert model.dtype == torch.float16
    model.shared.to(torch.float32)
    model.encoder.block[0].layer[0].SelfAttention.q.to(torch.float16)
    assert model.dtype == torch.float32


@contract("transformers.models.umt5.modeling_umt5.UMT5DenseGatedActDense.wo",
          "pipeline/weight_files/text_encoder_file.py (issue 18): T5's feed-forward casts wo's input to "
          "wo.weight.dtype, so the "
          "wo layers stay in the compute dtype rather than float8")
def _():
    model = tiny_umt5()
    feed_forward = model.encoder.block[0].layer[-1].DenseReluDense
    assert type(feed_forward).__name__ == "UMT5DenseGatedActDense"
    feed_forward.wo.to(torch.float16)
    seen = []
    feed_forward.wo.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.no_grad():
        feed_forward(torch.randn(1, 2, 16))
    assert seen == [torch.float16]


@contract("transformers.UMT5EncoderModel.tie_weights",
          "pipeline/random_weights.py, text_encoder_file.py (issue 18): with UMT5-XXL's tie_word_embeddings=False "
          "(that is about an LM head) the encoder's embed_tokens is still the shared embedding, as built and after "
          "tie_weights() (the 5.68B-parameter encoder; transformers 5.0 built a second 1.05B embedding)")
def _():
    model = tiny_umt5()
    assert model.encoder.embed_tokens.weight is model.shared.weight
    model.tie_weights()
    assert model.encoder.embed_tokens.weight is model.shared.weight


@contract("transformers.PreTrainedModel.from_pretrained",
          "pipeline/loader.py: CLIPVisionModel.from_pretrained(dir, subfolder=, torch_dtype=, local_files_only=True)")
def _():
    import tempfile

    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8, projection_dim=8))
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5 prefers dtype= (torch_dtype= still works)
        model.save_pretrained(Path(directory) / "image_encoder")
        loaded = CLIPVisionModel.from_pretrained(directory, subfolder="image_encoder", torch_dtype=torch.float16,
                                                 local_files_only=True)
    assert loaded.dtype == torch.float16


# ============================== torchao (the float8 extra) ==============================

@contract("torchao.quantization.quantize_",
          "pipeline/speed/acceleration.py apply_float8: quantize_(transformer, config, filter_fn=(module, fqn) "
          "-> bool)",
          needs="torchao")
def _():
    from torchao.quantization import quantize_

    takes(quantize_, "model", "config", "filter_fn")


@contract("torchao.quantization.Float8DynamicActivationFloat8WeightConfig",
          "pipeline/speed/acceleration.py apply_float8: the config, built with no arguments", needs="torchao")
def _():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

    Float8DynamicActivationFloat8WeightConfig()


# ============================== the tests ==============================


@pytest.mark.parametrize("name", list(CONTRACTS), ids=list(CONTRACTS))
def test_library_contract(name: str) -> None:
    entry = CONTRACTS[name]
    if entry.needs is not None and importlib.util.find_spec(entry.needs) is None:
        pytest.skip(f"{entry.needs} is not installed (an optional extra): {name} cannot be used nor checked")
    try:
        entry.check()
    except (AssertionError, AttributeError, ImportError, TypeError, ValueError) as exc:
        raise AssertionError(f"{name} no longer does what the code needs ({entry.used}): "
                             f"{type(exc).__name__}: {exc}") from exc


# An import from these packages is internal when a segment is private (`_x`), or, for the libraries below, when it
# is not from the top-level package (their submodules are not their API; torch's and safetensors' are).
LIBRARIES = ("diffusers", "torch", "peft", "transformers", "torchao", "gguf", "safetensors", "huggingface_hub",
             "accelerate", "tokenizers")
SUBMODULES_INTERNAL = ("diffusers", "peft", "transformers", "torchao")


def internal_imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top not in LIBRARIES:
                continue
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                private = any(part.startswith("_") for part in dotted.split("."))
                if private or ("." in node.module and top in SUBMODULES_INTERNAL):
                    found.add(dotted)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in LIBRARIES and any(p.startswith("_") for p in parts):
                    found.add(alias.name)
    return found


def test_every_internal_import_of_the_code_has_a_contract() -> None:
    """A private or non-API import added anywhere needs its entry above (with what the code needs of it)."""
    here = Path(__file__).resolve()
    uncovered: dict[str, set[str]] = {}
    for directory in CODE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            if path.resolve() == here or ".venv" in path.parts:
                continue
            for dotted in internal_imports(ast.parse(path.read_text(), str(path))):
                if not any(name == dotted or name.startswith(dotted + ".") for name in CONTRACTS):
                    uncovered.setdefault(dotted, set()).add(str(path.relative_to(ROOT)))
    assert not uncovered, "internal library names used without a contract in tests/test_library_contract.py: " + (
        "; ".join(f"{name} ({', '.join(sorted(paths))})" for name, paths in sorted(uncovered.items())))


def test_contract_ids_are_dotted_names() -> None:
    assert all(re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", name) for name in CONTRACTS), [
        n for n in CONTRACTS if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", n)]
