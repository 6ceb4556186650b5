"""The Particalize LoRA: every published Wan key layout loads, has the exact effect, fuses, and misfits are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import LoraMismatch
from pipeline.generator import VideoGenerator
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from tests.images import noise_image
from tests.lora_files import LAYOUTS, make_weights, write_lora

PARAMS = GenerationParams(width=32, height=32, numFrames=5, steps=2, seed=11, prompt="a glass dog shatters")
IMAGE = noise_image(32, 32)


def tiny(tmp_path: Path, lora: Path | None = None, strength: float = 1.0, fuse: bool = False) -> VideoGenerator:
    return VideoGenerator(get_preset("tiny"), weights_dir=tmp_path, lora_path=lora, lora_strength=strength,
                          fuse_lora=fuse)


@pytest.fixture(scope="module")
def base_frames(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return tiny(tmp_path_factory.mktemp("w")).generate(PARAMS, IMAGE).frames


@pytest.fixture(scope="module")
def weights():
    return make_weights(tiny(Path("/nonexistent")).pipe.transformer)


def effective_weight(linear: torch.nn.Module) -> torch.Tensor:
    """What the (possibly LoRA-wrapped) layer really computes: feed the identity, subtract the bias."""
    in_features = linear.in_features
    with torch.no_grad():
        eye = torch.eye(in_features)
        out = linear(eye)
        bias = linear.base_layer.bias if hasattr(linear, "base_layer") else linear.bias
        if bias is not None:
            out = out - bias
    return out.T


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_effective_weights_equal_w_plus_scaled_ba(tmp_path, weights, layout, strength):
    base = tiny(tmp_path)
    originals = {w.module: effective_weight(base.pipe.transformer.get_submodule(w.module)) for w in weights}
    gen = tiny(tmp_path, write_lora(tmp_path / f"{layout}.safetensors", weights, layout), strength=strength)
    assert gen.lora is not None and gen.lora.modules == len(weights)
    for w in weights:
        expected = originals[w.module] + strength * w.scale * (w.B @ w.A)
        actual = effective_weight(gen.pipe.transformer.get_submodule(w.module))
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, msg=f"{layout} {w.module}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_changes_the_video(tmp_path, weights, base_frames, layout):
    gen = tiny(tmp_path, write_lora(tmp_path / "l.safetensors", weights, layout))
    frames = gen.generate(PARAMS, IMAGE).frames
    assert np.abs(frames - base_frames).max() > 1e-3


def test_image_cross_attention_keys_are_applied(tmp_path, weights):
    """k_img/v_img (add_k_proj/add_v_proj) are what makes an I2V LoRA; they must not be dropped silently."""
    gen = tiny(tmp_path, write_lora(tmp_path / "l.safetensors", weights, "original_down_up_alpha"))
    wrapped = gen.pipe.transformer.get_submodule("blocks.0.attn2.add_k_proj")
    assert hasattr(wrapped, "lora_A") and "particalize" in wrapped.lora_A


def test_strength_zero_gives_the_base_video(tmp_path, weights, base_frames):
    gen = tiny(tmp_path, write_lora(tmp_path / "l.safetensors", weights, "kohya"), strength=0.0)
    np.testing.assert_allclose(gen.generate(PARAMS, IMAGE).frames, base_frames, atol=1e-5)


def test_fused_and_unfused_give_the_same_frames(tmp_path, weights):
    path = write_lora(tmp_path / "l.safetensors", weights, "original_down_up_alpha")
    unfused = tiny(tmp_path, path, strength=0.8).generate(PARAMS, IMAGE).frames
    fused_gen = tiny(tmp_path, path, strength=0.8, fuse=True)
    assert fused_gen.lora.fused
    # fused: plain Linear layers again, no per-step LoRA cost
    assert isinstance(fused_gen.pipe.transformer.get_submodule("blocks.0.attn1.to_q"), torch.nn.Linear)
    np.testing.assert_allclose(fused_gen.generate(PARAMS, IMAGE).frames, unfused, atol=1e-4)


def test_lora_with_wrong_shapes_is_refused(tmp_path):
    bad = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 48),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(24, 4),
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0),
    }
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraMismatch, match="does not fit"):
        tiny(tmp_path, tmp_path / "bad.safetensors")


def test_lora_for_more_blocks_than_the_model_has_is_refused(tmp_path, weights):
    far = {
        "transformer.blocks.7.attn1.to_q.lora_A.weight": torch.randn(4, 24),
        "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.randn(24, 4),
    }
    save_file(far, str(tmp_path / "far.safetensors"))
    with pytest.raises(LoraMismatch, match="no linear layer 'blocks.7.attn1.to_q'"):
        tiny(tmp_path, tmp_path / "far.safetensors")


def test_a_non_wan_lora_is_refused(tmp_path):
    sdxl = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 24),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(24, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(LoraMismatch):
        tiny(tmp_path, tmp_path / "sdxl.safetensors")


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoraMismatch, match="cannot read"):
        tiny(tmp_path, tmp_path / "junk.safetensors")
