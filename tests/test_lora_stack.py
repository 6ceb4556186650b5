"""Several LoRAs at once with their strengths, fused or not, and fast mode on a step-distilled speed LoRA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import InvalidParameter
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.lora.stack import LoraStackOptions
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.video import read_mp4
from tests.images import noise_image
from tests.lora_files import make_diffs, make_weights, write_lora
from tests.test_lora import PARAMS, assert_effect, expected

IMAGE = noise_image(32, 32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory):
    """Two style LoRAs (one with differences, in another layout) and a step-distill style speed LoRA."""
    tmp = tmp_path_factory.mktemp("loras")
    transformer = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp)).pipe.transformer
    originals = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    one = (make_weights(transformer, seed=1), [])
    two = (make_weights(transformer, rank=2, alpha=1.0, seed=2), make_diffs(transformer, seed=3))
    speed = (make_weights(transformer, rank=8, alpha=8.0, seed=4, magnitude=0.2), make_diffs(transformer, seed=5))
    paths = (write_lora(tmp / "one.safetensors", one[0], "kohya"),
             write_lora(tmp / "two.safetensors", *two[:1], "original_down_up_alpha", two[1]),
             write_lora(tmp / "speed.safetensors", speed[0], "original_lora_ab", speed[1]))
    return originals, (one, two, speed), paths


def stacked(tmp: Path, paths, a: float, b: float, fuse_lora: bool = False) -> VideoGenerator:
    stack = LoraStackOptions(loras=((paths[0], a), (paths[1], b)), fuse=fuse_lora)
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, loras=stack))


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (0.7, 0.3)])
def test_two_loras_equal_the_hand_computed_sum(tmp_path, files, a, b):
    originals, (one, two, _), paths = files
    gen = stacked(tmp_path, paths, a, b)
    assert [(info.name, info.strength) for info in gen.loras] == [("one", a), ("two", b)]
    assert_effect(gen, *expected(originals, [(a, *one), (b, *two)]), originals)


def test_fused_stack_equals_unfused(tmp_path, files):
    originals, (one, two, _), paths = files
    unfused = stacked(tmp_path, paths, 0.7, 0.3)
    fused = stacked(tmp_path, paths, 0.7, 0.3, fuse_lora=True)
    assert all(info.fused for info in fused.loras)
    assert isinstance(fused.pipe.transformer.get_submodule("blocks.1.ffn.net.2"), torch.nn.Linear)
    assert_effect(fused, *expected(originals, [(0.7, *one), (0.3, *two)]), originals)
    np.testing.assert_allclose(fused.generate(PARAMS, IMAGE).frames, unfused.generate(PARAMS, IMAGE).frames,
                               atol=1e-4)


def test_each_strength_changes_the_frames(tmp_path, files):
    paths = files[2]
    frames = {ab: stacked(tmp_path, paths, *ab).generate(PARAMS, IMAGE).frames
              for ab in [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5)]}
    assert np.abs(frames[(1.0, 1.0)] - frames[(0.5, 1.0)]).max() > 1e-3
    assert np.abs(frames[(1.0, 1.0)] - frames[(1.0, 0.5)]).max() > 1e-3


# --- fast mode ----------------------------------------------------------------------------------------------------

class ForwardCounter:
    """Counts the transformer's forwards and the timesteps they were given."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.timesteps: list[float] = []
        transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        self.timesteps.append(float(kwargs["timestep"].flatten()[0]))

    def take(self) -> list[float]:
        seen, self.timesteps = self.timesteps, []
        return seen


@pytest.fixture(scope="module")
def fast_gen(tmp_path_factory: pytest.TempPathFactory, files) -> VideoGenerator:
    paths = files[2]
    stack = LoraStackOptions(loras=((paths[0], 0.8),), speed_lora=(paths[2], 1.0))
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path_factory.mktemp("w"), loras=stack))


def test_fast_mode_takes_four_forwards_on_the_distilled_schedule_and_writes_an_mp4(fast_gen, tmp_path):
    counter = ForwardCounter(fast_gen.pipe.transformer)
    request = GenerationParams(width=32, height=32, numFrames=5, seed=3, mode="fast")  # steps 30, scale 5 as sent
    video = fast_gen.render(request, IMAGE, tmp_path / "fast.mp4")
    seen = counter.take()
    assert len(seen) == 4  # 4 steps, guidance off: one forward each
    assert seen == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-2)  # lightx2v's 1000/750/500/250, shift 5
    assert (video.params.mode, video.params.steps, video.params.scale, video.params.flow_shift) == ("fast", 4, 1.0, 5.0)
    meta, frames = read_mp4(tmp_path / "fast.mp4")
    assert frames.shape[:3] == (5, 32, 32)
    normal = GenerationParams(width=32, height=32, numFrames=5, seed=3)
    fast_gen.generate(normal, IMAGE)
    assert len(counter.take()) == 60  # the default 30 steps with guidance: two forwards each


def test_the_speed_lora_is_on_only_in_fast_mode_and_switching_is_exact(fast_gen, files):
    originals, (one, _, speed), _ = files
    small = GenerationParams(width=32, height=32, numFrames=5, steps=1, seed=3)
    for mode in ("fast", "normal", "fast", None):
        fast_gen.generate(small.model_copy(update={"mode": mode}), IMAGE)
        stack = [(0.8, *one)] + ([(1.0, *speed)] if mode == "fast" else [])
        assert_effect(fast_gen, *expected(originals, stack), originals)
    assert fast_gen.loras[-1].speed and fast_gen.loras[-1].name == "speed_speed"


def test_the_speed_lora_changes_the_video(fast_gen):
    request = GenerationParams(width=32, height=32, numFrames=5, steps=4, scale=1.0, seed=3)
    with_speed = fast_gen.generate(request.model_copy(update={"mode": "fast"}), IMAGE).frames
    without = fast_gen.generate(request.model_copy(update={"mode": "normal", "flow_shift": 5.0}), IMAGE).frames
    assert np.abs(with_speed - without).max() > 1e-3


def test_a_fast_server_uses_fast_mode_unless_a_request_says_normal(tmp_path, files):
    paths = files[2]
    gen = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path, mode="fast",
                                          loras=LoraStackOptions(speed_lora=(paths[2], 1.0), fuse=True)))
    counter = ForwardCounter(gen.pipe.transformer)
    gen.generate(GenerationParams(width=32, height=32, numFrames=5, seed=1), IMAGE)
    assert len(counter.take()) == 4
    gen.generate(GenerationParams(width=32, height=32, numFrames=5, steps=2, seed=1, mode="normal"), IMAGE)
    assert len(counter.take()) == 4  # 2 steps x 2 with guidance


def test_fast_mode_without_a_speed_lora_is_a_clear_error(tmp_path, files):
    gen = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path,
                                          loras=LoraStackOptions(loras=((files[2][0], 1.0),))))
    refused = r"\[mode\] must be 'normal' on this server \(fast mode needs a speed LoRA: PARTICALIZE_SPEED_LORA\)"
    with pytest.raises(InvalidParameter, match=refused + r", got 'fast'\."):
        gen.generate(GenerationParams(width=32, height=32, numFrames=5, mode="fast"), IMAGE)
    with pytest.raises(ValueError, match="PARTICALIZE_SPEED_LORA"):
        VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path, mode="fast"))
