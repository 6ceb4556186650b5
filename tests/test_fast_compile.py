"""Fast mode under torch.compile, as the server runs it: the Particalize LoRA fused, the speed LoRA an unfused
adapter switched per request. Switching modes must not recompile (each mode is compiled once, at warm-up), and
the compiled fast mode must give the eager fast mode's frames."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.lora.stack import LoraStackOptions
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.speed.acceleration import SpeedOptions
from tests.images import noise_image
from tests.lora_files import make_diffs, make_weights, write_lora

IMAGE = noise_image(32, 32)
SMALL = GenerationParams(width=32, height=32, numFrames=5, steps=2, seed=3)


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("loras")
    transformer = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp)).pipe.transformer
    style = write_lora(tmp / "style.safetensors", make_weights(transformer, seed=1), "kohya")
    speed = write_lora(tmp / "speed.safetensors", make_weights(transformer, rank=8, alpha=8.0, seed=4, magnitude=0.2),
                       "original_lora_ab", make_diffs(transformer, seed=5))
    return tmp, LoraStackOptions(loras=((style, 0.8),), speed_lora=(speed, 1.0))


def test_switching_modes_under_compile_compiles_nothing_after_the_warm_up(loras):
    import torch._dynamo
    from torch._dynamo.utils import counters

    tmp, stack = loras
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, speed=SpeedOptions(compile=True),
                                                   loras=stack))
        assert compiled.applied.compiled and compiled.loras[0].fused and not compiled.loras[-1].fused
        warmed = counters["stats"]["unique_graphs"]
        assert 1 <= warmed <= 2  # one graph per mode: adapters off (normal) and on (fast)
        torch._dynamo.config.error_on_recompile = True
        frames = {}
        for mode in ("fast", "normal", "fast", "normal", "fast"):
            frames[mode] = compiled.generate(SMALL.model_copy(update={"mode": mode}), IMAGE).frames
        assert counters["stats"]["unique_graphs"] == warmed
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    eager = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, speed=SpeedOptions(compile=False),
                                            loras=replace(stack, fuse=True)))
    for mode in ("normal", "fast"):
        expected = eager.generate(SMALL.model_copy(update={"mode": mode}), IMAGE).frames
        np.testing.assert_allclose(frames[mode], expected, atol=1e-4)
    assert np.abs(frames["fast"] - frames["normal"]).max() > 1e-3  # the switch really changed the model


def test_float8_with_a_speed_lora_quantizes_the_base_layers_only_and_keeps_switched_weights_in_bf16(loras):
    """torchao float8 needs CUDA: here the layer choice, made with what the LoRA stack switches per request."""
    from pipeline.speed.acceleration import Applied, apply_float8, float8_filter

    tmp, stack = loras
    gen = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, loras=replace(stack, fuse=True)))
    keep = gen.lora_stack.switched_parameters()
    switched_linear = "condition_embedder.image_embedder.ff.net.0.proj"  # lightx2v's img_emb.proj.1.diff
    assert f"{switched_linear}.weight" in keep and "blocks.0.attn1.norm_q.weight" in keep
    modules = dict(gen.pipe.transformer.named_modules())
    chosen = {fqn for fqn, module in modules.items() if float8_filter(module, fqn, keep)}
    wrapped = [fqn for fqn, module in modules.items() if hasattr(module, "lora_A") and "speed_speed" in module.lora_A]
    assert wrapped and all(f"{fqn}.base_layer" in chosen for fqn in wrapped
                           if modules[fqn].in_features % 16 == 0 and modules[fqn].out_features % 16 == 0)
    assert not any("lora_" in fqn for fqn in chosen)  # the adapter stays bf16 on top of the float8 base
    linear = modules[switched_linear]
    assert linear.in_features % 16 == 0 and linear.out_features % 16 == 0  # float8 would take its size...
    assert switched_linear not in chosen and float8_filter(linear, switched_linear)  # ...but not its switched weight

    applied = Applied()
    before = linear.weight.detach().clone()
    apply_float8(gen.pipe, torch.device("cpu"), applied, keep)
    assert not applied.float8 and "CUDA" in applied.notes[-1]  # refused here, with the reason
    torch.testing.assert_close(linear.weight, before)


def test_a_restart_with_a_speed_lora_takes_both_modes_from_the_compile_cache(loras, tmp_path, monkeypatch):
    """The warm-up compiles normal and fast mode, and the cache keeps both: a restarted worker compiles nothing."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    tmp, stack = loras
    cache_dir = tmp_path / "compile-cache"
    speed = SpeedOptions(compile=True, compile_cache_dir=cache_dir)
    try:
        for run in (1, 2):  # each "process" with an empty inductor cache of its own
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / f"inductor-{run}"))
            torch._dynamo.reset()
            counters.clear()
            gen = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, speed=speed, loras=stack))
            if run == 1:
                assert counters["inductor"]["fxgraph_cache_miss"] > 0
                assert json.loads(next(cache_dir.glob("*.json")).read_text())["lora_adapter_ranks"] == [8]
        assert counters["inductor"]["fxgraph_cache_hit"] >= 2 and counters["inductor"]["fxgraph_cache_miss"] == 0
        torch._dynamo.config.error_on_recompile = True
        for mode in ("fast", "normal"):
            gen.generate(SMALL.model_copy(update={"mode": mode}), IMAGE)
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
