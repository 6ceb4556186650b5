"""LoRAs on every base a transformer file gives: unfused on float8 and GGUF bases with the hand-computed effect
(pairs as compute-dtype adapters on the quantized layers, full differences exact on the layers they touch), fusing
into quantized weights refused saying to keep the LoRA unfused, and fused as before on a bf16 file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import LoraFuseRefused
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.lora.stack import LoraStackOptions, fuse_refusal
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_components
from pipeline.weight_files.files import WeightFiles
from pipeline.weight_files.quantized_layers import quantized_layers
from pipeline.weight_files.transformer_file import load_transformer_file
from tests.checkpoint_files import (
    gguf_quantized_keys,
    linear_weights,
    transformer_state,
    used_weight,
    write_fp8_transformer,
    write_gguf,
    write_transformer,
)
from tests.images import noise_image
from tests.lora_files import LoraDiff, LoraWeight, make_diffs, make_weights, write_lora

PARAMS = GenerationParams(width=32, height=32, numFrames=5, steps=2, seed=11, prompt="a glass dog shatters")
IMAGE = noise_image(32, 32)
STRENGTH = 0.8


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_tiny_components()["transformer"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, tiny) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bases")
    state, linear = transformer_state(tiny), linear_weights(tiny)
    return {
        "fp8_scaled": write_fp8_transformer(d / "fp8.safetensors", state, linear, scaled="scale_weight")[0],
        "gguf": write_gguf(d / "q8.gguf", state, gguf_quantized_keys(state, linear, tiny._keep_in_fp32_modules)),
        "bf16": write_transformer(d / "bf16.safetensors", state, torch.bfloat16),
    }


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, tiny) -> tuple[Path, list[LoraWeight], list[LoraDiff]]:
    """Pairs on every Linear a Wan LoRA trains, and every kind of full difference, also on a GGUF-quantized
    weight (the tiny model's ffn.2) and on float8 Linear weights (img_emb)."""
    weights, diffs = make_weights(tiny), make_diffs(tiny)
    gen = torch.Generator().manual_seed(9)
    diffs.append(LoraDiff("diffusion_model.blocks.0.ffn.2.diff", "blocks.0.ffn.net.2.weight",
                          torch.randn(24, 32, generator=gen) * 0.05))
    path = write_lora(tmp_path_factory.mktemp("lora") / "l.safetensors", weights, "original_down_up_alpha", diffs)
    return path, weights, diffs


def generator(tmp_path: Path, base: Path, lora_path: Path | None = None, lora_strength: float = 1.0,
              fuse_lora: bool = False) -> VideoGenerator:
    loras = LoraStackOptions(loras=((lora_path, lora_strength),) if lora_path else (), fuse=fuse_lora)
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), weights_dir=tmp_path, loras=loras,
                                           weight_files=WeightFiles(transformer=base)))


def effective_weight(linear: torch.nn.Module) -> torch.Tensor:
    """What the (LoRA-wrapped) layer computes: feed the identity, subtract the bias."""
    with torch.no_grad():
        out = linear(torch.eye(linear.in_features))
        bias = getattr(linear, "base_layer", linear).bias
        return (out - bias if bias is not None else out).T


@pytest.mark.parametrize("name", ["fp8_scaled", "gguf"])
def test_an_unfused_lora_on_a_quantized_base_has_the_hand_computed_effect(tmp_path, bases, lora, name):
    path, weights, diffs = lora
    base = load_transformer_file(bases[name], dict(TINY_TRANSFORMER_CONFIG), torch.float32)
    before = {key: used_weight(base, key).clone() for key in base.state_dict()}
    quantized_before = set(quantized_layers(base))
    gen = generator(tmp_path, bases[name], lora_path=path, lora_strength=STRENGTH)
    transformer = gen.pipe.transformer
    full = {d.param: d.value for d in diffs}
    for w in weights:
        layer = transformer.get_submodule(w.module)
        adapter = next(iter(layer.lora_A))
        assert layer.lora_A[adapter].weight.dtype == torch.float32  # the compute dtype, not the base's float8/uint8
        key = f"{w.module}.weight"
        want = before[key] + STRENGTH * (w.scale * (w.B @ w.A) + full.get(key, 0))
        torch.testing.assert_close(effective_weight(layer), want, atol=1e-5, rtol=1e-4, msg=w.module)
    for d in diffs:
        torch.testing.assert_close(used_weight(transformer, d.param), before[d.param] + STRENGTH * d.value,
                                   atol=1e-6, rtol=1e-5, msg=d.param)
    # only the layers a full difference touches were dequantized; every other quantized layer still is
    touched = {d.param.removesuffix(".weight") for d in diffs if d.param.endswith(".weight")}
    assert quantized_before & touched
    assert set(quantized_layers(transformer)) == quantized_before - touched


def test_strength_zero_on_a_float8_base_gives_that_bases_video(tmp_path, bases, lora):
    plain = generator(tmp_path, bases["fp8_scaled"]).generate(PARAMS, IMAGE).frames
    zero = generator(tmp_path, bases["fp8_scaled"], lora_path=lora[0], lora_strength=0.0)
    np.testing.assert_allclose(zero.generate(PARAMS, IMAGE).frames, plain, atol=1e-5)
    with_lora = generator(tmp_path, bases["fp8_scaled"], lora_path=lora[0], lora_strength=STRENGTH)
    assert np.abs(with_lora.generate(PARAMS, IMAGE).frames - plain).max() > 1e-3


@pytest.mark.parametrize("name", ["fp8_scaled", "gguf"])
def test_fusing_into_quantized_weights_is_refused_saying_to_keep_the_lora_unfused(tmp_path, bases, lora, name):
    kind = "float8_e4m3fn" if name == "fp8_scaled" else "GGUF Q8_0"
    with pytest.raises(LoraFuseRefused, match=rf"hold {kind} weights.*Keep the LoRAs unfused.*--fuse-lora off"):
        generator(tmp_path, bases[name], lora_path=lora[0], fuse_lora=True)


def test_fuse_refusal_says_which_bases_can_fuse(bases):
    assert fuse_refusal(build_tiny_components()["transformer"]) is None
    for name, fusable in (("bf16", True), ("fp8_scaled", False), ("gguf", False)):
        model = load_transformer_file(bases[name], dict(TINY_TRANSFORMER_CONFIG), torch.float32)
        assert (fuse_refusal(model) is None) is fusable, name


def test_a_lora_fuses_into_a_bf16_file_base_with_the_unfused_frames(tmp_path, bases, lora):
    unfused = generator(tmp_path, bases["bf16"], lora_path=lora[0], lora_strength=STRENGTH)
    fused = generator(tmp_path, bases["bf16"], lora_path=lora[0], lora_strength=STRENGTH, fuse_lora=True)
    assert fused.lora.fused and not unfused.lora.fused
    np.testing.assert_allclose(fused.generate(PARAMS, IMAGE).frames, unfused.generate(PARAMS, IMAGE).frames,
                               atol=1e-4)
