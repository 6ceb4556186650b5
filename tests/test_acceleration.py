"""The GPU speed options, checked on the CPU: the real-size random model's configs, compile by default on CUDA
with a persistent cache, FlashAttention-4 through diffusers' dispatch (and the fallback without it), fused QKV,
float8's layer choice, and the text encoder on the CPU."""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.speed import fa4
from pipeline.speed.acceleration import Applied, SpeedOptions, choose_attention, float8_filter, resolve_compile
from tests.images import noise_image

PARAMS = GenerationParams(width=48, height=32, numFrames=9, steps=3, seed=7, prompt="crystal shards")
IMAGE = noise_image(48, 32)
CUDA = torch.device("cuda")


def make(tmp: Path, **speed) -> VideoGenerator:
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, speed=SpeedOptions(**speed)))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> np.ndarray:
    return make(tmp_path_factory.mktemp("w")).generate(PARAMS, IMAGE).frames


def test_random_weights_build_the_real_configs_on_the_meta_device_without_allocating():
    from pipeline.random_weights import parameter_bytes, parameter_counts, random_components

    components = random_components("meta", torch.bfloat16)
    counts = {name: round(n / 1e9, 2) for name, n in parameter_counts(components).items()}
    # transformer, CLIP ViT-H/14 and VAE as measured on the H200; UMT5-XXL's encoder with its real vocabulary.
    assert counts == {"transformer": 16.39, "text_encoder": 5.68, "image_encoder": 0.63, "vae": 0.13}
    assert all(p.is_meta for name in counts for p in components[name].parameters())
    assert components["transformer"].dtype == torch.bfloat16 and components["text_encoder"].dtype == torch.bfloat16
    assert components["vae"].dtype == torch.float32 and components["image_encoder"].dtype == torch.float32
    sizes = parameter_bytes(components)
    assert 47e9 < sum(sizes.values()) < 47.5e9  # what must fit on the GPU before any activation
    assert torch.get_default_dtype() == torch.float32  # the build leaves the process default as it was


def test_a_random_weights_generator_makes_a_video_with_the_real_pipeline_parts(tmp_path, monkeypatch):
    """The same build at a CPU-sized scale: tokenizer, image processor, scheduler and VAE are the real ones."""
    from pipeline import random_weights as rw

    monkeypatch.setattr(rw, "WAN_I2V_14B_TRANSFORMER", rw.WAN_I2V_14B_TRANSFORMER | dict(
        num_attention_heads=2, attention_head_dim=8, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=1,
        image_dim=16, added_kv_proj_dim=16))
    monkeypatch.setattr(rw, "UMT5_XXL", rw.UMT5_XXL | dict(vocab_size=512, d_model=32, d_kv=8, d_ff=32,
                                                           num_layers=1, num_heads=2))
    monkeypatch.setattr(rw, "CLIP_VIT_H_14", rw.CLIP_VIT_H_14 | dict(hidden_size=16, intermediate_size=32,
                                                                     num_hidden_layers=2, num_attention_heads=2))
    gen = VideoGenerator(GeneratorOptions(get_preset("wan2.1-i2v-14b-480p"), tmp_path / "nothing-here",
                                          random_weights=True, device="cpu"))
    assert gen.random_weights
    video = gen.generate(PARAMS.model_copy(update={"steps": 2}), IMAGE)
    assert video.frames.shape == (9, 32, 48, 3) and np.isfinite(video.frames).all()


def test_random_weights_flag_reaches_the_settings_and_the_serve_banner(tmp_path):
    from particalize.cli import _settings, build_parser
    from particalize.cli_server import describe_environment

    args = build_parser().parse_args(["serve", "--model", "wan2.1-i2v-14b-480p", "--random-weights", "--no-compile",
                                      "--data-dir", str(tmp_path)])
    settings = _settings(args)
    assert settings.random_weights and settings.compile is False
    settings, lines, problem = describe_environment(settings, model_is_explicit=True)
    assert problem is None and settings.model == "wan2.1-i2v-14b-480p"  # no weights on disk needed
    assert any("RANDOM WEIGHTS" in line and "noise" in line for line in lines)


@pytest.mark.parametrize(
    ("options", "device", "expected"),
    [
        ({}, CUDA, True),  # the fastest exact configuration is the default on a GPU
        ({}, torch.device("cpu"), False),
        ({"compile": False}, CUDA, False),  # --no-compile
        ({"compile": True}, torch.device("cpu"), True),
        ({"memory_mode": "group_offload"}, CUDA, False),
    ],
)
def test_compile_is_on_by_default_on_cuda_only(options, device, expected):
    assert resolve_compile(SpeedOptions(**options), device)[0] is expected


def test_the_compile_cache_is_written_and_a_restart_reads_it_back_instead_of_compiling(tmp_path, monkeypatch):
    """The restart is simulated in-process: dynamo reset and an empty inductor cache directory."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cache_dir = tmp_path / "compile-cache"
    # Each "process" gets an empty inductor cache of its own, so nothing is found except through our file.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-1"))
    torch._dynamo.reset()
    counters.clear()
    first = make(tmp_path, compile=True, compile_cache_dir=cache_dir)
    saved = list(cache_dir.glob("*.bin"))
    assert len(saved) == 1 and saved[0].stat().st_size > 0
    assert '"compile_dynamic": true' in saved[0].with_suffix(".json").read_text()
    assert counters["inductor"]["fxgraph_cache_miss"] > 0
    expected = first.generate(PARAMS, IMAGE).frames
    written = saved[0].read_bytes()

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-2"))
    torch._dynamo.reset()
    counters.clear()
    try:
        second = make(tmp_path, compile=True, compile_cache_dir=cache_dir)
        assert counters["inductor"]["fxgraph_cache_hit"] > 0 and counters["inductor"]["fxgraph_cache_miss"] == 0
        assert saved[0].read_bytes() == written  # nothing new compiled: the file is left alone
        np.testing.assert_array_equal(second.generate(PARAMS, IMAGE).frames, expected)
        torch._dynamo.config.error_on_recompile = True  # dynamic shapes: a new size after the restart compiles nothing
        second.generate(PARAMS.model_copy(update={"width": 32, "height": 48, "numFrames": 5}), IMAGE)
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def test_an_unreadable_compile_cache_is_ignored_and_replaced(tmp_path, monkeypatch):
    from pipeline.speed.compile_cache import CompileCache

    cache = CompileCache(tmp_path, {"torch": torch.__version__, "x": 1})
    cache.path.write_bytes(b"half-written")
    assert cache.load() is False  # logged; the worker compiles instead of failing


def test_auto_attention_on_a_gpu_without_fa4_or_fa3_falls_back_to_sdpa_and_says_why(tmp_path):
    gen = make(tmp_path)
    applied = Applied()
    choose_attention(gen.pipe, "auto", CUDA, applied)  # no kernel package is installed here
    assert applied.attention_backend == "native"
    assert any("'flash_4' unavailable" in n and "flash-attn-4 is not installed" in n for n in applied.notes)
    assert any("'_flash_3' unavailable" in n for n in applied.notes)
    assert not any("'flash'" in n or "sage" in n for n in applied.notes)  # slower or approximate: never auto


def _sdpa_as_fa4(q, k, v, softmax_scale=None, causal=False):
    """What FA4's flash_attn_func computes, in its (batch, seq, heads, dim) layout, returning (out, lse)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=softmax_scale, is_causal=causal)
    return out.transpose(1, 2), None


@pytest.fixture
def fake_fa4(monkeypatch):
    """An importable `flash_attn.cute` (the flash-attn-4 wheel's module) whose kernel is PyTorch's SDPA."""
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName

    calls = []
    cute = types.ModuleType("flash_attn.cute")

    def kernel(q, k, v, **kwargs):
        torch._dynamo.graph_break()  # as FA4's CuTe DSL JIT: torch.compile cannot trace into it
        calls.append(q.shape)
        return _sdpa_as_fa4(q, k, v, **kwargs)

    cute.flash_attn_func = kernel
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    yield cute, calls
    _HUB_KERNELS_REGISTRY[AttentionBackendName.FLASH_4_HUB].kernel_fn = None


def test_fa4_runs_through_diffusers_dispatch_and_gives_the_sdpa_frames(tmp_path, plain, fake_fa4):
    cute, calls = fake_fa4
    gen = make(tmp_path)
    fa4.enable(gen.pipe.transformer)
    np.testing.assert_allclose(gen.generate(PARAMS, IMAGE).frames, plain, atol=1e-5)
    layers = gen.pipe.transformer.config.num_layers
    # every attention of cond and uncond: per layer self-attention, and cross-attention to the text and to the image
    assert len(calls) == PARAMS.steps * 2 * layers * 3


def test_fa4_compiles_whole_graphs_as_an_opaque_op(fake_fa4):
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    fa4.enable(torch.nn.Module())  # registers the kernel in diffusers' flash_4_hub slot
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))

    def attention(q, k, v):
        return dispatch_attention_fn(q, k, v, backend=AttentionBackendName.FLASH_4_HUB) * 2

    compiled = torch.compile(attention, fullgraph=True, backend="eager")  # fullgraph: no break around the kernel
    torch.testing.assert_close(compiled(q, k, v), _sdpa_as_fa4(q, k, v)[0] * 2)


def test_fa4_is_refused_off_hopper_and_blackwell(fake_fa4, monkeypatch):
    assert "needs a CUDA GPU" in fa4.unsupported_reason(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "SM80" in fa4.unsupported_reason(CUDA, torch.bfloat16)
    for blackwell_or_hopper in ((9, 0), (10, 0), (11, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cc=blackwell_or_hopper: cc)
        assert fa4.unsupported_reason(CUDA, torch.bfloat16) is None
    assert "float32" in fa4.unsupported_reason(CUDA, torch.float32)


def test_fa4_is_checked_against_sdpa_before_use(tmp_path, plain, fake_fa4, monkeypatch):
    cute, _ = fake_fa4
    monkeypatch.setattr(fa4, "unsupported_reason", lambda device, dtype: None)  # as on an H100/H200
    monkeypatch.setattr(fa4, "max_abs_error", functools.partial(fa4.max_abs_error, shape=(1, 64, 2, 16)))
    gen = make(tmp_path)
    reason, error = fa4.try_enable(gen.pipe.transformer, torch.device("cpu"))
    assert reason is None and error < 1e-6
    cute.flash_attn_func = lambda q, k, v, **kw: (v.flip(1), None)  # a wrong kernel
    reason, error = fa4.try_enable(gen.pipe.transformer, torch.device("cpu"))
    assert "differs from SDPA" in reason and error > fa4.MAX_ABS_ERROR

    def failing(q, k, v, **kw):
        raise RuntimeError("CuTe DSL: cannot compile for this GPU")

    cute.flash_attn_func = failing  # a kernel that cannot run here: refused at start, not in the first task
    untouched = make(tmp_path)
    reason, error = fa4.try_enable(untouched.pipe.transformer, torch.device("cpu"))
    assert "failed its check" in reason and "cannot compile" in reason and error is None
    np.testing.assert_array_equal(untouched.generate(PARAMS, IMAGE).frames, plain)  # still on SDPA


def _stored_bytes(module: torch.nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    return sum(storages.values())


def test_fused_qkv_projections_give_the_same_frames_in_no_more_memory(tmp_path, plain):
    before = _stored_bytes(make(tmp_path).pipe.transformer)
    gen = make(tmp_path, fuse_qkv=True)
    assert gen.applied.fused_qkv
    blocks = gen.pipe.transformer.blocks
    assert all(hasattr(b.attn1, "to_qkv") and hasattr(b.attn2, "to_kv") and hasattr(b.attn2, "to_added_kv")
               for b in blocks)
    assert _stored_bytes(gen.pipe.transformer) == before  # the separate projections are views, not copies
    q_rows = blocks[0].attn1.to_q.out_features
    torch.testing.assert_close(blocks[0].attn1.to_k.weight, blocks[0].attn1.to_qkv.weight[q_rows:2 * q_rows])
    assert not float8_filter(blocks[0].attn1.to_k, "blocks.0.attn1.to_k")  # unused view: not quantized again
    np.testing.assert_allclose(gen.generate(PARAMS, IMAGE).frames, plain, atol=1e-5)


def test_float8_quantizes_the_base_linears_and_leaves_an_unfused_lora_in_bf16():
    linear = torch.nn.Linear(5120, 13824)
    assert float8_filter(linear, "blocks.0.ffn.net.0.proj")
    assert float8_filter(linear, "blocks.0.attn1.to_q.base_layer")
    assert not float8_filter(torch.nn.Linear(5120, 32), "blocks.0.attn1.to_q.lora_A.particalize")
    assert not float8_filter(torch.nn.Linear(24, 24), "blocks.0.attn1.to_q")  # sizes float8 matmuls refuse
    assert not float8_filter(torch.nn.LayerNorm(5120), "blocks.0.norm2")


def test_text_encoder_on_the_cpu_gives_the_same_frames(tmp_path, plain):
    gen = make(tmp_path, text_encoder_on_cpu=True)
    assert gen.applied.text_encoder_on_cpu
    assert next(gen.pipe.text_encoder.parameters()).device.type == "cpu"
    assert gen.embeddings.encode_device == torch.device("cpu")
    np.testing.assert_array_equal(gen.generate(PARAMS, IMAGE).frames, plain)
