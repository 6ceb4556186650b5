"""The UMT5 text encoder from one file as users have it (transformers' T5 names, as google/umt5-xxl and ComfyUI's
umt5_xxl files): bf16 exactly, ComfyUI's fp8 scaled file kept float8 with its scales applied, a video with it; and a
file that is not a UMT5 encoder of the preset's size refused naming the keys."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel, UMT5EncoderModel

from pipeline.errors import WeightFormatError
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.tiny import build_tiny_components
from pipeline.weight_files.files import WeightFiles
from pipeline.weight_files.loaded_file import loaded_file_of
from pipeline.weight_files.memory import text_encoder_bytes
from pipeline.weight_files.quantized_layers import Float8Linear, module_bytes
from pipeline.weight_files.text_encoder_file import load_text_encoder_file
from tests.checkpoint_files import dequantized_fp8, write_text_encoder
from tests.images import noise_image

PARAMS = GenerationParams(width=32, height=32, numFrames=5, steps=2, seed=5, prompt="a glass dog shatters")
IMAGE = noise_image(32, 32)
IDS = torch.tensor([[5, 17, 42, 99, 1, 0, 0, 0]])


@pytest.fixture(scope="module")
def tiny() -> UMT5EncoderModel:
    return build_tiny_components()["text_encoder"]


def encode(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, attention_mask=(IDS > 0).long()).last_hidden_state


def holding(tiny: UMT5EncoderModel, values: dict[str, torch.Tensor]) -> UMT5EncoderModel:
    """The tiny encoder with its values replaced (float32)."""
    model = copy.deepcopy(tiny)
    model.load_state_dict({**model.state_dict(), **values})
    return model


def used_weight(model: torch.nn.Module, key: str) -> torch.Tensor:
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(module, Float8Linear):
        return module.dequantized_weight().detach()
    return getattr(module, leaf).detach()


def test_a_bf16_file_loads_exactly_and_encodes_as_the_encoder_rounded_to_bf16(tmp_path, tiny):
    path, stored = write_text_encoder(tmp_path / "umt5.safetensors", tiny, torch.bfloat16)
    assert "encoder.embed_tokens.weight" not in stored and "shared.weight" in stored
    model = load_text_encoder_file(path, tiny.config, torch.float32)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    for key, value in stored.items():
        torch.testing.assert_close(used_weight(model, key), value.float(), rtol=0, atol=0, msg=key)
    rounded = holding(tiny, {k: v.float() for k, v in stored.items()})
    torch.testing.assert_close(encode(model), encode(rounded), rtol=0, atol=0)
    info = loaded_file_of(model)
    assert info.role == "text_encoder" and info.stored == f"bfloat16 x {len(stored)}"


def test_comfyuis_fp8_scaled_file_stays_float8_with_each_scale_applied(tmp_path, tiny):
    path, stored = write_text_encoder(tmp_path / "umt5_fp8_scaled.safetensors", tiny, scaled=True)
    assert "scaled_fp8" in stored
    from safetensors.torch import load_file  # ComfyUI's files may carry the tokenizer too: not a weight

    save_file({**load_file(str(path)), "spiece_model": torch.tensor(list(b"\x0a\x04spm"), dtype=torch.uint8)},
              str(path))
    model = load_text_encoder_file(path, tiny.config, torch.float32)
    float8 = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert float8 and all(n.rsplit(".", 1)[1] in {"q", "k", "v", "o", "wi_0", "wi_1"} for n in float8)
    # T5 casts wo's input to wo's weight dtype, and the model's dtype is its embedding's: both stay float32
    assert all(m.weight.dtype == torch.float32 for n, m in model.named_modules() if n.endswith(".wo"))
    assert model.dtype == torch.float32 and model.shared.weight.dtype == torch.float32
    assert module_bytes(model) == text_encoder_bytes("fp8_scaled", tiny.config, torch.float32)
    values = {}
    for key, value in stored.items():
        if key.endswith(".weight"):
            want = dequantized_fp8(stored, key) if value.dtype == torch.float8_e4m3fn else value.float()
            torch.testing.assert_close(used_weight(model, key), want, rtol=0, atol=0, msg=key)
            values[key] = want
    torch.testing.assert_close(encode(model), encode(holding(tiny, values)), rtol=0, atol=0)
    relative = (encode(model) - encode(tiny)).norm() / encode(tiny).norm()
    assert 0 < relative < 0.1  # float8 is close to the original, not equal
    assert "float8_e4m3fn Linear weights (scaled)" in loaded_file_of(model).held


def test_a_video_from_a_text_encoder_file_and_a_transformer_file(tmp_path, tiny):
    """Both components from bf16 files: exactly the video of the tiny pipeline with both rounded to bf16."""
    from tests.checkpoint_files import transformer_state, write_transformer

    components = build_tiny_components()
    state = transformer_state(components["transformer"])
    te_path, te_stored = write_text_encoder(tmp_path / "umt5.safetensors", tiny, torch.bfloat16)
    files = WeightFiles(transformer=write_transformer(tmp_path / "wan.safetensors", state, torch.bfloat16),
                        text_encoder=te_path)
    from_files = VideoGenerator(GeneratorOptions(get_preset("tiny"), weights_dir=tmp_path, weight_files=files))
    assert loaded_file_of(from_files.pipe.text_encoder).path == te_path
    reference = VideoGenerator(GeneratorOptions(get_preset("tiny"), weights_dir=tmp_path))
    reference.pipe.transformer.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()})
    reference.pipe.text_encoder.load_state_dict({**reference.pipe.text_encoder.state_dict(),
                                                 **{k: v.float() for k, v in te_stored.items()}})
    video = from_files.generate(PARAMS, IMAGE).frames
    np.testing.assert_array_equal(video, reference.generate(PARAMS, IMAGE).frames)
    assert video.shape == (5, 32, 32, 3)


def test_a_t5_encoder_that_is_not_umt5_is_refused_for_its_missing_relative_biases(tmp_path, tiny):
    c = tiny.config
    t5 = T5EncoderModel(T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
                                 num_layers=c.num_layers, num_heads=c.num_heads, feed_forward_proj="gated-gelu",
                                 relative_attention_num_buckets=c.relative_attention_num_buckets))
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if "embed_tokens" not in k},
              str(tmp_path / "t5.safetensors"))
    with pytest.raises(WeightFormatError, match=r"1 key is missing \(encoder\.block\.1\.layer\.0\.SelfAttention"
                                                r"\.relative_attention_bias\.weight\).*UMT5-XXL"):
        load_text_encoder_file(tmp_path / "t5.safetensors", tiny.config, torch.float32)


def test_an_encoder_of_another_vocabulary_is_refused_with_the_shapes(tmp_path, tiny):
    other = UMT5EncoderModel(tiny.config.__class__(**{**tiny.config.to_dict(), "vocab_size": 300}))
    write_text_encoder(tmp_path / "other.safetensors", other, torch.bfloat16)
    with pytest.raises(WeightFormatError, match=r"shared\.weight is \[300, 16\] in the file, the config wants "
                                                rf"\[{tiny.config.vocab_size}, 16\]"):
        load_text_encoder_file(tmp_path / "other.safetensors", tiny.config, torch.float32)


def test_a_gguf_text_encoder_is_refused(tmp_path, tiny):
    (tmp_path / "umt5.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(WeightFormatError, match="GGUF text encoders are not supported"):
        load_text_encoder_file(tmp_path / "umt5.gguf", tiny.config, torch.float32)


def test_a_transformer_file_given_as_the_text_encoder_is_refused(tmp_path, tiny):
    from tests.checkpoint_files import transformer_state, write_transformer

    path = write_transformer(Path(tmp_path / "wan.safetensors"),
                             transformer_state(build_tiny_components()["transformer"]))
    with pytest.raises(WeightFormatError, match="does not fit the preset's UMT5 text encoder"):
        load_text_encoder_file(path, tiny.config, torch.float32)
