"""LoRAs sent with one request, on the warm generator (pipeline.lora.request): loaded on top of the run's tool,
frames equal to a fresh generator that loaded them as files, dropped after the run so that the next run (of any
tool) is bit-equal to a fresh process's; a file that does not fit refused before anything runs, leaving the model
as it was; under compile, a request run compiles nothing and the tools' warm graphs stay valid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import LoraMismatch
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.lora.stack import LoraStackOptions
from pipeline.presets import get_preset
from tests.images import noise_image
from tests.lora_files import make_diffs, make_weights, write_lora
from tests.test_lora import PARAMS

IMAGE = noise_image(32, 32)
TOOL = "remade/Squish"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory):
    """The default tool's LoRA, one tool's, and two request LoRAs (one with full differences, on the FFN and
    attention layers the tools wrap too, one on fewer layers than any tool: its wrappers must go again)."""
    tmp = tmp_path_factory.mktemp("request-loras")
    transformer = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp)).pipe.transformer
    default = write_lora(tmp / "particalize.safetensors", make_weights(transformer, seed=11), "diffusers")
    squish = write_lora(tmp / "squish.safetensors", make_weights(transformer, rank=2, alpha=1.0, seed=12), "kohya")
    request = write_lora(tmp / "request.safetensors", make_weights(transformer, seed=21, magnitude=0.25),
                         "original_down_up_alpha", make_diffs(transformer, seed=22))
    weights = [w for w in make_weights(transformer, rank=3, seed=23) if ".ffn." in w.module]
    partial = write_lora(tmp / "partial.safetensors", weights, "kohya_no_alpha")
    return tmp, {"default": default, "squish": squish, "request": request, "partial": partial}


def generator(tmp, loras=(), tools=()) -> VideoGenerator:
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, loras=LoraStackOptions(loras=loras, tools=tools)))


@pytest.fixture(scope="module")
def warm(files) -> VideoGenerator:
    tmp, f = files
    return generator(tmp, ((f["default"], 1.0),), ((TOOL, ((f["squish"], 0.9),)),))


@pytest.fixture(scope="module")
def fresh(files) -> dict[str, np.ndarray]:
    """Frames of fresh generators that loaded the stacks as files: each tool alone, and each with request LoRAs."""
    tmp, f = files
    stacks = {
        "default": ((f["default"], 1.0),),
        "squish": ((f["squish"], 0.9),),
        "default+request": ((f["default"], 1.0), (f["request"], 0.7)),
        "squish+request+partial": ((f["squish"], 0.9), (f["request"], 0.7), (f["partial"], 1.3)),
    }
    return {name: generator(tmp, stack).generate(PARAMS, IMAGE).frames for name, stack in stacks.items()}


def test_a_run_with_request_loras_equals_a_fresh_generator_with_them_as_files(files, warm, fresh):
    _, f = files
    with_request = warm.generate(PARAMS, IMAGE, loras=((f["request"], 0.7),)).frames
    assert np.array_equal(with_request, fresh["default+request"])
    assert np.abs(with_request - fresh["default"]).max() > 1e-3
    both = warm.generate(PARAMS, IMAGE, tool=TOOL, loras=((f["request"], 0.7), (f["partial"], 1.3))).frames
    assert np.array_equal(both, fresh["squish+request+partial"])


def test_after_a_request_run_the_model_is_as_it_was(files, warm, fresh):
    """The adapters are gone, the weights their differences changed are the originals again, no layer keeps a
    wrapper it did not have, and the next runs of each tool are bit-equal to fresh processes' (checked over several
    alternations)."""
    _, f = files
    modules = {name: type(module) for name, module in warm.pipe.transformer.named_modules()}
    state = {name: value.clone() for name, value in warm.pipe.transformer.state_dict().items()}
    adapters = [info.name for info in warm.loras]
    for round_ in range(3):
        warm.generate(PARAMS, IMAGE, tool=TOOL if round_ % 2 else "",
                      loras=((f["partial"], 1.3), (f["request"], 0.7)))
        assert [info.name for info in warm.loras] == adapters
        assert {name: type(m) for name, m in warm.pipe.transformer.named_modules()} == modules
        after = warm.pipe.transformer.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
        assert np.array_equal(warm.generate(PARAMS, IMAGE, tool=TOOL).frames, fresh["squish"]), round_
        assert np.array_equal(warm.generate(PARAMS, IMAGE).frames, fresh["default"]), round_


def test_request_loras_on_a_base_without_any_lora_leave_it_bare(files):
    tmp, f = files
    bare = generator(tmp)
    before = bare.generate(PARAMS, IMAGE).frames
    bare.generate(PARAMS, IMAGE, loras=((f["partial"], 1.0),))
    assert not hasattr(bare.pipe.transformer, "peft_config") or not bare.pipe.transformer.peft_config
    assert not any("lora" in type(m).__name__.lower() for m in bare.pipe.transformer.modules())
    assert np.array_equal(bare.generate(PARAMS, IMAGE).frames, before)


@pytest.mark.parametrize(("kind", "expected"), [
    ("not safetensors", "cannot read"),
    ("other model", "is not a LoRA for this model"),
    ("wrong shapes", "is not a LoRA for this model"),
])
def test_a_file_that_does_not_fit_is_refused_before_the_run_and_changes_nothing(files, warm, fresh, tmp_path,
                                                                                kind, expected):
    _, f = files
    path = tmp_path / "bad.safetensors"
    if kind == "not safetensors":
        path.write_bytes(b"<html>not found</html>")
    elif kind == "other model":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
                   "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(path))
    else:
        layer = warm.pipe.transformer.blocks[0].attn1.to_q.get_base_layer()
        save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, layer.in_features + 8),
                   "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(layer.out_features, 4)},
                  str(path))
    with pytest.raises(LoraMismatch, match=expected):
        warm.check_loras([f["request"], path])
    with pytest.raises(LoraMismatch):
        warm.generate(PARAMS, IMAGE, loras=((f["request"], 0.7), (path, 1.0)))
    assert [info.request for info in warm.loras] == [False, False]
    assert np.array_equal(warm.generate(PARAMS, IMAGE).frames, fresh["default"])


def test_under_compile_a_request_run_compiles_nothing_and_the_warm_graphs_stay_valid(files):
    """The single-tool server on CUDA: its LoRA fused before compiling. The request run is eager (force_eager
    stance: its adapters wrap layers of the compiled blocks) and its frames match an eager generator's; the runs
    after it reuse the warm-up's graphs (dynamo's recompile error is on) and match a fresh eager run."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pipeline.params import GenerationParams
    from pipeline.speed.acceleration import SpeedOptions

    tmp, f = files
    small = GenerationParams(width=32, height=32, numFrames=5, steps=2, seed=3)
    stack = LoraStackOptions(loras=((f["default"], 1.0),))
    request = ((f["request"], 0.7), (f["partial"], 1.3))
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, speed=SpeedOptions(compile=True),
                                                   loras=stack))
        assert compiled.applied.compiled and all(info.fused for info in compiled.loras)
        warmed = counters["stats"]["unique_graphs"]
        assert warmed >= 1
        torch._dynamo.config.error_on_recompile = True
        got = compiled.generate(small, IMAGE, loras=request).frames
        after = compiled.generate(small, IMAGE).frames
        assert counters["stats"]["unique_graphs"] == warmed
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    eager = generator(tmp, stack.loras)
    np.testing.assert_allclose(got, eager.generate(small, IMAGE, loras=request).frames, atol=2e-3)
    np.testing.assert_allclose(after, eager.generate(small, IMAGE).frames, atol=2e-3)
    assert np.abs(got - after).max() > 1e-3
