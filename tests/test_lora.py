"""LoRAs as published: every layout loads with the exact effect, every key applied or the file refused by name."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import LoraMismatch
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.lora.stack import LoraStackOptions
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from tests.images import noise_image
from tests.lora_files import LAYOUTS, LoraDiff, LoraWeight, make_diffs, make_weights, state_dict_for, write_lora

PARAMS = GenerationParams(width=32, height=32, numFrames=5, steps=2, seed=11, prompt="a glass dog shatters")
IMAGE = noise_image(32, 32)


def tiny(tmp_path: Path, lora: Path | None = None, strength: float = 1.0, fuse: bool = False,
         lora_strict: bool = True) -> VideoGenerator:
    stack = LoraStackOptions(loras=((lora, strength),) if lora is not None else (), fuse=fuse, strict=lora_strict)
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path, loras=stack))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> VideoGenerator:
    return tiny(tmp_path_factory.mktemp("w"))


@pytest.fixture(scope="module")
def base_frames(base: VideoGenerator) -> np.ndarray:
    return base.generate(PARAMS, IMAGE).frames


@pytest.fixture(scope="module")
def weights(base: VideoGenerator) -> list[LoraWeight]:
    return make_weights(base.pipe.transformer)


@pytest.fixture(scope="module")
def diffs(base: VideoGenerator) -> list[LoraDiff]:
    return make_diffs(base.pipe.transformer)


@pytest.fixture(scope="module")
def originals(base: VideoGenerator) -> dict[str, torch.Tensor]:
    """The tiny model's parameters before any LoRA (it is built from fixed seeds: the same in every test)."""
    return {name: p.detach().clone() for name, p in base.pipe.transformer.named_parameters()}


def effective_weight(linear: torch.nn.Module) -> torch.Tensor:
    """What the (possibly LoRA-wrapped) layer really computes: feed the identity, subtract the bias."""
    with torch.no_grad():
        out = linear(torch.eye(linear.in_features))
        bias = linear.base_layer.bias if hasattr(linear, "base_layer") else linear.bias
        if bias is not None:
            out = out - bias
    return out.T


def param(gen: VideoGenerator, name: str) -> torch.Tensor:
    """A parameter's value in use, by its diffusers name (also inside a LoRA-wrapped Linear)."""
    owner, _, leaf = name.rpartition(".")
    module = gen.pipe.transformer.get_submodule(owner) if owner else gen.pipe.transformer
    return getattr(getattr(module, "base_layer", module), leaf).detach()


def expected(originals: dict[str, torch.Tensor], stack: list[tuple[float, list[LoraWeight], list[LoraDiff]]],
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """By hand: W + sum over LoRAs of strength x alpha / rank x B @ A, and p + sum of strength x diff."""
    linears: dict[str, torch.Tensor] = {}
    params: dict[str, torch.Tensor] = {}
    for strength, ws, ds in stack:
        for w in ws:
            before = linears.get(w.module, originals[f"{w.module}.weight"])
            linears[w.module] = before + strength * w.scale * (w.B @ w.A)
        for d in ds:
            params[d.param] = params.get(d.param, originals[d.param]) + strength * d.value
    return linears, params


def assert_effect(gen: VideoGenerator, linears: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                  originals: dict[str, torch.Tensor]) -> None:
    for module, weight in linears.items():
        torch.testing.assert_close(effective_weight(gen.pipe.transformer.get_submodule(module)), weight,
                                   atol=1e-5, rtol=1e-4, msg=module)
    for name, value in params.items():
        torch.testing.assert_close(param(gen, name), value, atol=1e-6, rtol=1e-5, msg=name)
    for name, value in originals.items():  # nothing else moved
        if name not in params and name.removesuffix(".weight") not in linears:
            torch.testing.assert_close(param(gen, name), value, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_each_layout_has_the_hand_computed_effect(tmp_path, weights, originals, layout, strength):
    gen = tiny(tmp_path, write_lora(tmp_path / f"{layout}.safetensors", weights, layout), strength=strength)
    info = gen.lora
    assert info is not None and info.modules == len(weights) and info.skipped == 0
    assert_effect(gen, *expected(originals, [(strength, weights, [])]), originals)


@pytest.mark.parametrize("layout", ["original_down_up_alpha", "original_lora_ab"])
def test_a_step_distill_style_file_with_every_difference_kind_is_applied_whole(tmp_path, weights, diffs, originals,
                                                                              layout):
    """Block LoRAs plus diff_b on every Linear, diff on norm_q/norm_k/norm_k_img/norm3, diff_m on each modulation
    table and the head's, img_emb.proj.*, patch embedding and embedders: 22+ tensors diffusers alone drops."""
    path = write_lora(tmp_path / "distill.safetensors", weights, layout, diffs)
    gen = tiny(tmp_path, path, strength=0.7)
    info = gen.lora
    assert info.keys == len(state_dict_for(weights, layout)) + len(diffs)
    assert info.skipped == 0 and info.modules == len(weights) and info.diffs == len(diffs)
    assert_effect(gen, *expected(originals, [(0.7, weights, diffs)]), originals)


def test_the_differences_change_the_video(tmp_path, base, weights, diffs):
    only_pairs = tiny(tmp_path, write_lora(tmp_path / "p.safetensors", weights, "original_down_up_alpha"))
    whole = tiny(tmp_path, write_lora(tmp_path / "w.safetensors", weights, "original_down_up_alpha", diffs))
    assert np.abs(whole.generate(PARAMS, IMAGE).frames - only_pairs.generate(PARAMS, IMAGE).frames).max() > 1e-3


@pytest.mark.parametrize("layout", ["kohya", "kohya_lora_ab", "kohya_no_alpha", "original_down_up", "peft_bare"])
def test_partial_files_load_and_change_only_what_they_cover(tmp_path, weights, originals, layout):
    """Some blocks, some projections (a musubi file trained on attention of block 1 only, say)."""
    some = [w for w in weights if w.module.startswith("blocks.1.attn2.") or w.module == "blocks.0.ffn.net.2"]
    some = [dataclasses.replace(w, A=w.A[:2], B=w.B[:, :2]) if "ffn" in w.module else w for w in some]  # two ranks
    gen = tiny(tmp_path, write_lora(tmp_path / f"{layout}.safetensors", some, layout), strength=0.9)
    assert gen.lora.modules == len(some) and gen.lora.skipped == 0
    assert_effect(gen, *expected(originals, [(0.9, some, [])]), originals)


@pytest.mark.parametrize("layout", ["diffusers", "original_down_up_alpha", "kohya"])
def test_each_layout_changes_the_video(tmp_path, weights, base_frames, layout):
    gen = tiny(tmp_path, write_lora(tmp_path / "l.safetensors", weights, layout))
    assert np.abs(gen.generate(PARAMS, IMAGE).frames - base_frames).max() > 1e-3


def test_image_cross_attention_keys_are_applied(tmp_path, weights):
    """k_img/v_img (add_k_proj/add_v_proj) are what makes an I2V LoRA; they must not be dropped silently."""
    gen = tiny(tmp_path, write_lora(tmp_path / "style.safetensors", weights, "original_down_up_alpha"))
    wrapped = gen.pipe.transformer.get_submodule("blocks.0.attn2.add_k_proj")
    assert "style" in wrapped.lora_A


def test_strength_zero_gives_the_base_video(tmp_path, weights, diffs, base_frames):
    gen = tiny(tmp_path, write_lora(tmp_path / "l.safetensors", weights, "kohya", diffs), strength=0.0)
    np.testing.assert_allclose(gen.generate(PARAMS, IMAGE).frames, base_frames, atol=1e-5)


def test_fused_and_unfused_give_the_same_frames(tmp_path, weights, diffs):
    path = write_lora(tmp_path / "l.safetensors", weights, "original_down_up_alpha", diffs)
    unfused = tiny(tmp_path, path, strength=0.8).generate(PARAMS, IMAGE).frames
    fused_gen = tiny(tmp_path, path, strength=0.8, fuse=True)
    assert fused_gen.lora.fused
    # fused: plain Linear layers again, no per-step LoRA cost
    assert isinstance(fused_gen.pipe.transformer.get_submodule("blocks.0.attn1.to_q"), torch.nn.Linear)
    np.testing.assert_allclose(fused_gen.generate(PARAMS, IMAGE).frames, unfused, atol=1e-4)


# --- refused, by name ---------------------------------------------------------------------------------------------

def _with(tmp_path: Path, weights: list[LoraWeight], extra: dict[str, torch.Tensor]) -> Path:
    sd = {**state_dict_for(weights, "original_down_up_alpha"), **extra}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    return tmp_path / "bad.safetensors"


@pytest.mark.parametrize("extra, named, why", [
    ({"diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight": torch.randn(4, 24),
      "diffusion_model.blocks.0.self_attn.q_proj.lora_up.weight": torch.randn(24, 4)},
     "diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight", "no layer 'blocks.0.self_attn.q_proj'"),
    ({"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.randn(4, 24),
      "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.randn(24, 4)},
     "diffusion_model.blocks.7.self_attn.q.lora_down.weight", "no layer 'blocks.7.self_attn.q'"),
    ({"diffusion_model.blocks.0.norm3.diff": torch.randn(48)},
     "diffusion_model.blocks.0.norm3.diff", "shape (48,) does not fit blocks.0.norm2.weight (24,)"),
    ({"diffusion_model.blocks.0.diff_m": torch.randn(1, 2, 24)},
     "diffusion_model.blocks.0.diff_m", "does not fit blocks.0.scale_shift_table (1, 6, 24)"),
    ({"diffusion_model.blocks.0.self_attn.q.dora_scale": torch.randn(24)},
     "diffusion_model.blocks.0.self_attn.q.dora_scale", "DoRA"),
    ({"diffusion_model.time_projection.1.lora_down.weight": torch.randn(4, 24)},
     "diffusion_model.time_projection.1.lora_down.weight", "no lora_up"),
])
def test_one_unknown_or_misshaped_key_refuses_the_file_naming_it(tmp_path, weights, extra, named, why):
    with pytest.raises(LoraMismatch) as refused:
        tiny(tmp_path, _with(tmp_path, weights, extra))
    assert named in str(refused.value) and why in str(refused.value)
    assert "PARTICALIZE_LORA_STRICT=false" in str(refused.value)


def test_a_pair_with_wrong_shapes_is_refused(tmp_path):
    bad = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 48),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(24, 4),
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0),
    }
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraMismatch, match=r"do not fit blocks\.0\.attn1\.to_q \(in_features 24"):
        tiny(tmp_path, tmp_path / "bad.safetensors")


def test_not_strict_loads_what_fits_and_warns_with_the_count(tmp_path, weights, originals, caplog):
    extra = {"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.randn(4, 24),
             "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.randn(24, 4),
             "diffusion_model.blocks.0.norm3.diff": torch.randn(48)}
    path = _with(tmp_path, weights, extra)
    with caplog.at_level(logging.WARNING, logger="pipeline.lora.stack"):
        gen = tiny(tmp_path, path, strength=0.5, lora_strict=False)
    assert gen.lora.skipped == 3 and gen.lora.modules == len(weights)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"3 of {len(weights) * 3 + 3} keys NOT applied" in warning and "blocks.7.self_attn.q" in warning
    assert_effect(gen, *expected(originals, [(0.5, weights, [])]), originals)


def test_a_non_wan_lora_is_refused(tmp_path):
    sdxl = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 24),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(24, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(LoraMismatch, match="down_blocks_0_attentions_0_proj_in"):
        tiny(tmp_path, tmp_path / "sdxl.safetensors", lora_strict=False)  # nothing fits: refused even then


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoraMismatch, match="cannot read"):
        tiny(tmp_path, tmp_path / "junk.safetensors")
