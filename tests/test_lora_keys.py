"""Reading a LoRA file's own keys: every published name of a part finds it, every kind goes where it belongs."""

from __future__ import annotations

import pytest
import torch

from pipeline.lora.diffs import WeightDiffs
from pipeline.lora.keys import ModelParts, original_name, plan_lora
from pipeline.lora.stack import LoraStack
from pipeline.tiny import build_tiny_pipeline
from tests.lora_files import target_modules


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def parts(pipe) -> ModelParts:
    return ModelParts.of(pipe.transformer)


def test_every_trained_layer_has_its_original_and_kohya_name(pipe, parts):
    for module in target_modules(pipe.transformer):
        original = original_name(module)
        assert parts.aliases[original] == module and parts.aliases[original.replace(".", "_")] == module
    assert parts.aliases["blocks_1_cross_attn_norm_k_img"] == "blocks.1.attn2.norm_added_k"
    assert parts.aliases["blocks.0.norm3"] == "blocks.0.norm2"  # Wan's cross-attention norm is diffusers' norm2
    assert parts.aliases["head.head"] == "proj_out" and parts.aliases["img_emb.proj.1"].endswith("ff.net.0.proj")


@pytest.mark.parametrize("key, param", [
    ("diffusion_model.blocks.1.diff_m", "blocks.1.scale_shift_table"),
    ("diffusion_model.blocks.1.modulation.diff", "blocks.1.scale_shift_table"),
    ("lora_unet_blocks_1.diff_m", "blocks.1.scale_shift_table"),
    ("diffusion_model.head.diff_m", "scale_shift_table"),
    ("diffusion_model.blocks.0.cross_attn.norm_k_img.diff", "blocks.0.attn2.norm_added_k.weight"),
    ("transformer.blocks.0.attn2.norm_added_k.diff", "blocks.0.attn2.norm_added_k.weight"),
    ("diffusion_model.patch_embedding.diff_b", "patch_embedding.bias"),
    ("blocks.0.ffn.2.diff_b", "blocks.0.ffn.net.2.bias"),
])
def test_each_difference_finds_its_parameter(pipe, parts, key, param):
    shape = dict(pipe.transformer.named_parameters())[param].shape
    plan = plan_lora({key: torch.ones(shape)}, parts)
    assert plan.problems == [] and list(plan.deltas) == [param] and plan.delta_keys[param] == [key]


def test_a_peft_lora_b_bias_is_a_bias_difference_scaled_like_its_pair(parts):
    a, b, bias = torch.randn(4, 24), torch.randn(24, 4), torch.randn(24)
    plan = plan_lora({"blocks.0.attn1.to_q.lora_A.weight": a, "blocks.0.attn1.to_q.lora_B.weight": b,
                      "blocks.0.attn1.to_q.lora_B.bias": bias, "blocks.0.attn1.to_q.alpha": torch.tensor(2.0)}, parts)
    assert plan.problems == [] and plan.pairs["blocks.0.attn1.to_q"].scale == 0.5
    torch.testing.assert_close(plan.deltas["blocks.0.attn1.to_q.bias"], 0.5 * bias)
    applied_keys = sum(len(p.keys) for p in plan.pairs.values()) + sum(len(k) for k in plan.delta_keys.values())
    assert applied_keys == plan.keys == 4


def test_a_pair_on_the_patch_embedding_is_multiplied_out_and_applied(pipe, tmp_path):
    from safetensors.torch import save_file

    original = pipe.transformer.patch_embedding.weight.detach().clone()
    down, up = torch.randn(3, 36, 1, 2, 2), torch.randn(24, 3, 1, 1, 1)
    save_file({"lora_unet_patch_embedding.lora_down.weight": down, "lora_unet_patch_embedding.lora_up.weight": up,
               "lora_unet_patch_embedding.alpha": torch.tensor(1.5)}, str(tmp_path / "conv.safetensors"))
    stack = LoraStack(build_tiny_pipeline())
    info = stack.load(tmp_path / "conv.safetensors", 0.5)
    assert (info.modules, info.diffs, info.skipped) == (0, 1, 0)
    expected = original + 0.5 * 0.5 * (up.reshape(24, 3) @ down.reshape(3, -1)).reshape(original.shape)
    torch.testing.assert_close(stack.pipe.transformer.patch_embedding.weight.detach(), expected)


def test_switching_differences_on_and_off_restores_the_original_exactly(pipe):
    module = build_tiny_pipeline().transformer
    diffs = WeightDiffs(module)
    name = "blocks.0.norm2.bias"
    original = module.get_parameter(name).detach().clone()
    delta_a, delta_b = torch.randn(24) / 3, torch.randn(24) / 7
    diffs.add("a", {name: delta_a}, 0.0)
    diffs.add("b", {name: delta_b}, 0.0)
    for _ in range(50):
        diffs.set_weights({"a": 0.3, "b": 1.7})
        diffs.set_weights({"a": 0.9})
    torch.testing.assert_close(module.get_parameter(name).detach(), original + 0.9 * delta_a, rtol=0, atol=1e-7)
    diffs.set_weights({})
    assert torch.equal(module.get_parameter(name).detach(), original)
    diffs.set_weights({"a": 1.0, "b": 0.5})
    diffs.fold(["a"])  # fused: a stays at 1.0, b still switches
    diffs.set_weights({})
    torch.testing.assert_close(module.get_parameter(name).detach(), original + delta_a, rtol=0, atol=1e-7)
