"""Speed and memory options: each runs on the tiny preset; exact ones give the plain frames, caches stay bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.lora.stack import LoraStackOptions
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.speed.acceleration import SpeedOptions
from tests.images import noise_image
from tests.lora_files import make_weights, write_lora

PARAMS = GenerationParams(width=48, height=32, numFrames=9, steps=4, seed=21, prompt="crystal shards")
IMAGE = noise_image(48, 32)
# Approximate caches may deviate from the plain path; this is the bound this suite holds them to
# (frames are in [0, 1]). On the tiny random model every step changes a lot, the worst case for caching.
CACHE_MAX_MEAN_ABS_ERROR = 0.05
# VAE tiling blends overlapping tiles: approximate too. Random VAE weights make seams worse than real ones.
TILING_MAX_MEAN_ABS_ERROR = 0.05


def make(tmp: Path, lora: Path | None = None, **speed) -> VideoGenerator:
    stack = LoraStackOptions(loras=((lora, 1.0),) if lora is not None else ())
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, loras=stack, speed=SpeedOptions(**speed)))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> np.ndarray:
    return make(tmp_path_factory.mktemp("w")).generate(PARAMS, IMAGE).frames


def test_an_unavailable_attention_backend_falls_back_to_sdpa_and_says_why(tmp_path, plain):
    gen = make(tmp_path, attention_backend="flash")
    assert gen.applied.attention_backend == "native"
    assert any("needs CUDA" in n for n in gen.applied.notes)
    np.testing.assert_allclose(gen.generate(PARAMS, IMAGE).frames, plain, atol=1e-6)


def test_math_attention_backend_gives_the_same_frames(tmp_path, plain):
    gen = make(tmp_path, attention_backend="_native_math")
    assert gen.applied.attention_backend == "_native_math"
    np.testing.assert_allclose(gen.generate(PARAMS, IMAGE).frames, plain, atol=1e-4)


def test_prompt_encodings_are_cached_and_exact(tmp_path, plain):
    gen = make(tmp_path)
    first = gen.generate(PARAMS, IMAGE).frames
    second = gen.generate(PARAMS.model_copy(update={"seed": 21}), noise_image(48, 32, seed=3)).frames
    assert gen.embeddings.prompts.hits == 1 and gen.embeddings.prompts.misses == 1
    np.testing.assert_array_equal(first, plain)
    assert second.shape == first.shape


def test_cache_off_still_works(tmp_path, plain):
    gen = make(tmp_path, encode_cache_size=0)
    np.testing.assert_array_equal(gen.generate(PARAMS, IMAGE).frames, plain)
    assert gen.embeddings.prompts.hits == 0


def test_batched_guidance_gives_the_same_frames_in_half_the_forwards(tmp_path, plain):
    gen = make(tmp_path, cfg_batch=True)
    frames = gen.generate(PARAMS, IMAGE).frames
    assert gen.applied.guidance_hook.batched_calls == PARAMS.steps  # one batched forward per step
    np.testing.assert_allclose(frames, plain, atol=1e-4)
    no_guidance = PARAMS.model_copy(update={"scale": 1.0})
    np.testing.assert_allclose(gen.generate(no_guidance, IMAGE).frames,
                               make(tmp_path).generate(no_guidance, IMAGE).frames, atol=1e-5)
    assert gen.applied.guidance_hook.batched_calls == PARAMS.steps  # nothing to batch without guidance


def test_group_offload_gives_the_same_frames(tmp_path, plain):
    gen = make(tmp_path, memory_mode="group_offload")
    assert gen.applied.memory_mode == "group_offload"
    np.testing.assert_allclose(gen.generate(PARAMS, IMAGE).frames, plain, atol=1e-5)


def test_vae_tiling_stays_close(tmp_path):
    params = PARAMS.model_copy(update={"width": 96, "height": 96, "steps": 2})
    base = make(tmp_path).generate(params, noise_image(96, 96)).frames
    gen = make(tmp_path, vae_tiling=True)
    gen.pipe.vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64,
                               tile_sample_stride_height=32, tile_sample_stride_width=32)
    tiled = gen.generate(params, noise_image(96, 96)).frames
    assert gen.applied.vae_tiling
    assert 0 < np.abs(tiled - base).mean() < TILING_MAX_MEAN_ABS_ERROR  # > 0: tiling really happened


@pytest.mark.parametrize("cache", ["first_block", "taylorseer"])
def test_step_caches_stay_within_the_stated_bound_and_reset_between_runs(tmp_path, plain, cache):
    gen = make(tmp_path, step_cache=cache, step_cache_threshold=0.05, step_cache_interval=2)
    params = PARAMS.model_copy(update={"steps": 8})
    reference = make(tmp_path).generate(params, IMAGE).frames
    a = gen.generate(params, IMAGE).frames
    b = gen.generate(params, IMAGE).frames
    np.testing.assert_array_equal(a, b)  # no state leaks from one video into the next
    # > 0: the cache really skipped work (a cache whose patterns match no module would be a silent no-op)
    assert 0 < np.abs(a - reference).mean() < CACHE_MAX_MEAN_ABS_ERROR


def test_float8_on_cpu_is_refused_with_the_reason(tmp_path, plain):
    gen = make(tmp_path, float8=True)
    assert not gen.applied.float8
    assert any("compute capability" in n for n in gen.applied.notes)
    np.testing.assert_allclose(gen.generate(PARAMS, IMAGE).frames, plain, atol=1e-6)


def test_compile_warms_up_fuses_the_lora_and_never_recompiles_per_request(tmp_path):
    import torch._dynamo

    lora = write_lora(tmp_path / "l.safetensors", make_weights(make(tmp_path).pipe.transformer), "kohya")
    eager = make(tmp_path, lora=lora)
    compiled = make(tmp_path, lora=lora, compile=True)
    assert compiled.applied.compiled and compiled.lora.fused
    torch._dynamo.config.error_on_recompile = True
    try:
        for update in ({}, {"width": 32, "height": 48, "steps": 3, "scale": 3.0, "flowShift": 2.0, "seed": 5},
                       {"numFrames": 5}):
            params = PARAMS.model_copy(update=update)
            np.testing.assert_allclose(compiled.generate(params, IMAGE).frames,
                                       eager.generate(params, IMAGE).frames, atol=1e-4)
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def test_context_parallelism_in_one_process_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="runs in a process group of 2 or more processes"):
        make(tmp_path, context_parallel="ulysses")
