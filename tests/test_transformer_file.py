"""Transformer single files as users have them: every layout and format loads with the tensors it stores (exact for
the lossless ones, within the format's error for fp8 and GGUF), fp8 stays float8 in memory, ComfyUI's scales are
applied, a video is made from each, and a file that does not fit is refused with the keys that show it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from pipeline.errors import WeightFormatError, WeightsMissing
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.loader import load_base_pipeline
from pipeline.params import GenerationParams
from pipeline.presets import ModelPreset, get_preset
from pipeline.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_components
from pipeline.weight_files.files import WeightFiles
from pipeline.weight_files.loaded_file import loaded_file_of
from pipeline.weight_files.memory import transformer_bytes
from pipeline.weight_files.quantized_layers import Float8Linear, module_bytes, quantized_layers
from pipeline.weight_files.transformer_file import load_transformer_file
from tests.checkpoint_files import (
    COMFY_PREFIX,
    dequantized_fp8,
    gguf_quantized_keys,
    linear_weights,
    to_original_names,
    transformer_state,
    used_weight,
    write_fp8_transformer,
    write_gguf,
    write_transformer,
)
from tests.images import noise_image

PARAMS = GenerationParams(width=32, height=32, numFrames=5, steps=2, seed=3, prompt="a glass dog shatters")
IMAGE = noise_image(32, 32)
CONFIG = dict(TINY_TRANSFORMER_CONFIG)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
RELATIVE_STEP = {torch.float8_e4m3fn: 2.0**-3, torch.float8_e5m2: 2.0**-2}
"""Spacing of representable values relative to a value's magnitude (3 and 2 mantissa bits): rounding errs by half."""
SUBNORMAL_STEP = {torch.float8_e4m3fn: 2.0**-9, torch.float8_e5m2: 2.0**-16}
"""Spacing of the values below the smallest normal one (where the relative bound does not hold)."""


@pytest.fixture(scope="module")
def tiny() -> WanTransformer3DModel:
    return build_tiny_components()["transformer"]


@pytest.fixture(scope="module")
def state(tiny: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    return transformer_state(tiny)


@pytest.fixture(scope="module")
def linear(tiny: WanTransformer3DModel) -> set[str]:
    return linear_weights(tiny)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny, state, linear) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("transformer-files")
    quantize = gguf_quantized_keys(state, linear, tiny._keep_in_fp32_modules)
    return {
        "fp32": write_transformer(d / "fp32.safetensors", state),
        "bf16": write_transformer(d / "bf16.safetensors", state, torch.bfloat16, "comfyui"),
        "fp8": write_fp8_transformer(d / "fp8.safetensors", state, linear)[0],
        "fp8_scaled": write_fp8_transformer(d / "fp8s.safetensors", state, linear, scaled="scale_weight")[0],
        "gguf": write_gguf(d / "q8.gguf", state, quantize, "Q8_0"),
    }


def frames(tmp_path: Path, files: WeightFiles | None = None, state: dict[str, torch.Tensor] | None = None,
           preset: ModelPreset | None = None) -> np.ndarray:
    """A tiny video; `files` as the settings give them, `state`: the tiny transformer's values replaced."""
    gen = VideoGenerator(GeneratorOptions(preset or get_preset("tiny"), weights_dir=tmp_path,
                                          weight_files=files or WeightFiles()))
    if state is not None:
        gen.pipe.transformer.load_state_dict(state)
    return gen.generate(PARAMS, IMAGE).frames


@pytest.fixture(scope="module")
def plain_frames(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return frames(tmp_path_factory.mktemp("plain"))


# --- the layouts and the lossless dtypes: exact ---------------------------------------------------------------------

def test_the_written_files_use_wans_original_key_names(files):
    from safetensors import safe_open

    with safe_open(str(files["fp32"]), "pt") as fh:
        keys = set(fh.keys())
    assert {"blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k_img.weight", "blocks.0.norm3.weight",
            "head.modulation", "img_emb.proj.1.weight", "time_projection.1.weight"} <= keys
    assert not any("attn1" in k or "to_q" in k for k in keys)
    with safe_open(str(files["bf16"]), "pt") as fh:
        assert all(k.startswith(COMFY_PREFIX) for k in fh.keys())  # noqa: SIM118 (safe_open is no dict)


@pytest.mark.parametrize("layout", ["original", "comfyui", "diffusers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lossless_files_load_exactly_what_they_store(tmp_path, state, layout, dtype):
    model = load_transformer_file(write_transformer(tmp_path / "t.safetensors", state, dtype, layout), CONFIG,
                                  torch.float32)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value.to(dtype).float(), rtol=0, atol=0, msg=key)
    assert model.dtype == torch.float32 and not quantized_layers(model)


def test_a_bf16_file_gives_the_model_the_diffusers_directory_gives(tmp_path, state):
    """Same dtype per tensor as from_pretrained: diffusers' float32 modules (rope, time embedder, modulation
    tables, norms) in float32 and the rest in bf16, and the same values."""
    rounded = WanTransformer3DModel(**CONFIG)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()})
    rounded.save_pretrained(tmp_path / "dir")
    from_dir = WanTransformer3DModel.from_pretrained(tmp_path / "dir", torch_dtype=torch.bfloat16)
    from_file = load_transformer_file(write_transformer(tmp_path / "t.safetensors", state, torch.bfloat16), CONFIG,
                                      torch.bfloat16)
    want = {**dict(from_dir.named_parameters()), **dict(from_dir.named_buffers())}
    got = {**dict(from_file.named_parameters()), **dict(from_file.named_buffers())}
    assert set(got) == set(want)
    assert any(t.dtype == torch.float32 for t in want.values()) and any(t.dtype == torch.bfloat16
                                                                        for t in want.values())
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


# --- fp8: stays float8, scales applied ----------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", FP8)
def test_fp8_weights_stay_float8_in_memory_and_dequantize_within_the_formats_error(tmp_path, tiny, state, linear,
                                                                                   fp8):
    path, stored = write_fp8_transformer(tmp_path / "t.safetensors", state, linear, fp8=fp8)
    model = load_transformer_file(path, CONFIG, torch.float32)
    float8 = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert float8 == {k for k in linear if "time_embedder" not in k}  # diffusers keeps the time embedder float32
    for key in float8:
        assert model.get_submodule(key.removesuffix(".weight")).weight.dtype == fp8
    assert module_bytes(model) == transformer_bytes("fp8", CONFIG, torch.float32)
    assert module_bytes(model) < module_bytes(tiny) * 0.75
    for key in linear:
        used = used_weight(model, key)
        torch.testing.assert_close(used, dequantized_fp8(stored, key), rtol=0, atol=0, msg=key)  # what it stores
        error = (used - state[key]).abs()
        assert (error <= (state[key].abs() * RELATIVE_STEP[fp8] + SUBNORMAL_STEP[fp8]) / 2).all(), key
        assert error.max() > 0, key  # it really is float8
    info = loaded_file_of(model)
    assert info.layout == "ComfyUI (model.diffusion_model.)" and info.container == "safetensors"
    assert f"{str(fp8).removeprefix('torch.')} Linear weights" in info.held


@pytest.mark.parametrize("convention", ["scale_weight", "weight_scale"])
def test_comfyui_scaled_fp8_applies_each_layers_scale(tmp_path, state, linear, convention):
    path, stored = write_fp8_transformer(tmp_path / "t.safetensors", state, linear, scaled=convention,
                                         prefix=convention == "scale_weight")
    model = load_transformer_file(path, CONFIG, torch.float32)
    assert "(scaled)" in loaded_file_of(model).held
    for key in linear:
        used = used_weight(model, key)
        raw = stored[key].float()
        assert raw.abs().max() > 100 * state[key].abs().max()  # unscaled, the values would be far off
        torch.testing.assert_close(used, dequantized_fp8(stored, key), rtol=0, atol=0, msg=key)
        scale = state[key].abs().max() / 448
        e4m3 = torch.float8_e4m3fn
        bound = (state[key].abs() * RELATIVE_STEP[e4m3] + scale * SUBNORMAL_STEP[e4m3]) / 2
        assert ((used - state[key]).abs() <= bound * 1.0001).all(), key
    assert module_bytes(model) == transformer_bytes("fp8_scaled", CONFIG, torch.float32)


# --- GGUF -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype, steps", [("Q8_0", 127), ("Q4_0", 8)])
def test_gguf_keeps_its_blocks_and_dequantizes_within_the_formats_error(tmp_path, tiny, state, linear, qtype, steps):
    quantize = gguf_quantized_keys(state, linear, tiny._keep_in_fp32_modules)
    assert quantize  # the tiny model has Linear weights whose rows are whole Q8_0/Q4_0 blocks
    model = load_transformer_file(write_gguf(tmp_path / "t.gguf", state, quantize, qtype), CONFIG, torch.float32)
    assert set(quantized_layers(model)) == {k.removesuffix(".weight") for k in quantize}
    assert set(quantized_layers(model).values()) == {f"GGUF {qtype}"}
    assert module_bytes(model) < module_bytes(tiny)
    if qtype == "Q8_0":  # the memory table's rule, exactly
        assert module_bytes(model) == transformer_bytes("gguf_Q8_0", CONFIG, torch.float32)
    for key, value in state.items():
        used = used_weight(model, key)
        if key in quantize:  # one quantization step of its block at most, plus float16 scale rounding
            bound = value.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / steps * 1.01 + 1e-6
            assert ((used - value).reshape(-1, 32).abs() <= bound).all(), key
            assert (used - value).abs().max() > 0, key
        else:  # written as F32
            torch.testing.assert_close(used, value, rtol=0, atol=0, msg=key)
    assert loaded_file_of(model).container == "gguf" and loaded_file_of(model).layout == "original Wan"


# --- a video from each --------------------------------------------------------------------------------------------

def test_an_fp32_file_gives_exactly_the_plain_tiny_frames(tmp_path, files, plain_frames):
    np.testing.assert_array_equal(frames(tmp_path, WeightFiles(transformer=files["fp32"])), plain_frames)


def test_a_bf16_file_gives_the_frames_of_the_tiny_model_rounded_to_bf16(tmp_path, files, state, plain_frames):
    """The plain tiny run is float32: the bf16 file holds its weights rounded to bf16. Loaded into the float32 run,
    it gives exactly the frames of the tiny transformer whose weights were rounded to bf16 and back."""
    rounded = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    from_file = frames(tmp_path, WeightFiles(transformer=files["bf16"]))
    np.testing.assert_array_equal(from_file, frames(tmp_path, state=rounded))
    assert np.isfinite(from_file).all() and from_file.shape == plain_frames.shape


@pytest.mark.parametrize("name", ["fp8", "fp8_scaled", "gguf"])
def test_a_quantized_file_gives_the_frames_of_the_values_it_stores(tmp_path, files, state, plain_frames, name):
    """fp8 and GGUF files make a video, exactly the one a float32 model holding their dequantized values makes,
    and close to the plain video (the quantization error is small)."""
    model = load_transformer_file(files[name], CONFIG, torch.float32)
    values = {key: used_weight(model, key).float() for key in state}
    from_file = frames(tmp_path, WeightFiles(transformer=files[name]))
    np.testing.assert_array_equal(from_file, frames(tmp_path, state=values))
    assert from_file.shape == plain_frames.shape and np.isfinite(from_file).all()
    assert np.abs(from_file - plain_frames).mean() < 0.05


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


@pytest.mark.parametrize("name", ["bf16", "gguf"])
def test_loading_asks_no_hub_for_anything(no_network, tmp_path, files, name):
    pipe = load_base_pipeline(get_preset("tiny"), tmp_path, torch.device("cpu"),
                              weight_files=WeightFiles(transformer=files[name]))
    assert loaded_file_of(pipe.transformer).path == files[name]


# --- refused, saying why ------------------------------------------------------------------------------------------

def test_a_missing_file_is_weights_missing(tmp_path):
    with pytest.raises(WeightsMissing, match="does not exist"):
        load_transformer_file(tmp_path / "nope.safetensors", CONFIG, torch.float32)


@pytest.mark.parametrize("name, message", [("wan.pth", "pickles"), ("wan.ckpt", "pickles"),
                                           ("wan.onnx", "unknown extension '.onnx'")])
def test_other_extensions_are_refused_by_name(tmp_path, name, message):
    (tmp_path / name).write_bytes(b"\0" * 64)
    with pytest.raises(WeightFormatError, match=message):
        load_transformer_file(tmp_path / name, CONFIG, torch.float32)


def test_a_file_that_is_not_a_wan_transformer_names_the_keys_expected(tmp_path):
    text_encoder = build_tiny_components()["text_encoder"]
    save_file({k: v.contiguous() for k, v in text_encoder.state_dict().items() if "embed_tokens" not in k},
              str(tmp_path / "umt5.safetensors"))
    with pytest.raises(WeightFormatError, match=r"not a Wan2.1 transformer.*head\.modulation.*encoder\.block"):
        load_transformer_file(tmp_path / "umt5.safetensors", CONFIG, torch.float32)


def test_a_truncated_file_is_refused(tmp_path, files):
    (tmp_path / "cut.safetensors").write_bytes(files["fp32"].read_bytes()[:1000])
    with pytest.raises(WeightFormatError, match="cannot read cut.safetensors"):
        load_transformer_file(tmp_path / "cut.safetensors", CONFIG, torch.float32)


def test_a_transformer_of_another_size_is_refused_with_both_sizes(tmp_path):
    """As a 1.3B (width 1536, 30 blocks) file given to the 14B preset: shapes named as the file has them."""
    other = WanTransformer3DModel(**{**CONFIG, "num_attention_heads": 3, "num_layers": 3,
                                     "added_kv_proj_dim": 36})
    path = write_transformer(tmp_path / "other.safetensors", transformer_state(other))
    with pytest.raises(WeightFormatError) as err:
        load_transformer_file(path, CONFIG, torch.float32)
    text = str(err.value)
    assert ("80 tensors have other shapes (head.modulation is [1, 2, 36] in the file, the config wants [1, 2, 24]"
            in text)
    assert "32 keys fit nothing (blocks.2." in text
    assert "width 36, 3 blocks, image-to-video" in text and "wants width 24, 2 blocks, image-to-video" in text


def test_a_text_to_video_transformer_is_refused_for_lacking_the_image_layers(tmp_path):
    t2v = WanTransformer3DModel(**{**CONFIG, "image_dim": None, "added_kv_proj_dim": None, "in_channels": 16})
    path = write_transformer(tmp_path / "t2v.safetensors", transformer_state(t2v))
    missing = r"text-to-video \(no image layers\).*18 keys are missing \(condition_embedder\.image_embedder"
    with pytest.raises(WeightFormatError, match=missing):
        load_transformer_file(path, CONFIG, torch.float32)


def test_a_key_that_fits_nothing_is_refused_by_its_name_in_the_file(tmp_path, state):
    original = to_original_names(dict(state))
    original["blocks.0.self_attn.q_extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightFormatError, match=r"1 key fits nothing \(blocks\.0\.self_attn\.q_extra\.weight\)"):
        load_transformer_file(tmp_path / "extra.safetensors", CONFIG, torch.float32)


def _scaled_file(tmp_path: Path, state, linear, edit) -> Path:
    path, _ = write_fp8_transformer(tmp_path / "s.safetensors", state, linear, scaled="weight_scale", prefix=False)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update({"blocks.0.self_attn.q.weight_scale_2": torch.ones(1)}), "NVFP4"),
    (lambda sd: sd.update({"blocks.0.self_attn.q.comfy_quant": torch.tensor(list(b'{"format": "int8"}'),
                                                                             dtype=torch.uint8)}),
     "format 'int8' is not supported"),
    (lambda sd: sd.update({"blocks.0.self_attn.q.weight": sd["blocks.0.self_attn.q.weight"].to(torch.bfloat16)}),
     "scales a bfloat16 weight"),
    (lambda sd: sd.update({"blocks.0.self_attn.q.weight_scale": torch.ones(3, 8)}), "block-wise scales"),
])
def test_scales_that_cannot_be_applied_are_refused_by_name(tmp_path, state, linear, edit, message):
    with pytest.raises(WeightFormatError, match=message):
        load_transformer_file(_scaled_file(tmp_path, state, linear, edit), CONFIG, torch.float32)


def test_random_weights_and_a_file_together_are_refused(tmp_path, files):
    with pytest.raises(WeightFormatError, match="random weights"):
        load_base_pipeline(get_preset("wan2.1-i2v-14b-480p"), tmp_path, torch.device("cpu"), random_weights=True,
                           weight_files=WeightFiles(transformer=files["fp32"]))


# --- the rest of the pipeline from a diffusers directory ----------------------------------------------------------

def test_a_diffusers_directory_without_transformer_weights_loads_with_a_transformer_file(tmp_path, files,
                                                                                         plain_frames):
    """The file replaces the directory's transformer: its weights need not be there, its config.json is used."""
    from pipeline.tiny import build_tiny_pipeline

    directory = tmp_path / "wan-local"
    build_tiny_pipeline().save_pretrained(directory)
    for weights in (directory / "transformer").glob("*.safetensors"):
        weights.unlink()
    preset = get_preset(str(directory))
    with pytest.raises(WeightsMissing, match="transformer"):
        load_base_pipeline(preset, tmp_path, torch.device("cpu"))
    from_dir = frames(tmp_path, WeightFiles(transformer=files["fp32"]), preset=preset)
    np.testing.assert_allclose(from_dir, plain_frames, atol=1e-5)  # as the in-code tiny model, through from_pretrained


def test_a_directorys_own_configs_are_the_ones_files_load_with(tmp_path):
    from pipeline.random_weights import WAN_I2V_14B_TRANSFORMER
    from pipeline.weight_files.files import directory_text_encoder_config, directory_transformer_config

    assert directory_transformer_config(None) == WAN_I2V_14B_TRANSFORMER  # a preset not fetched: the real config
    assert directory_text_encoder_config(tmp_path).d_model == 4096
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"num_layers": 3}')
    assert directory_transformer_config(tmp_path) == {"num_layers": 3}


# --- speed options that would undo a quantized base ----------------------------------------------------------------

def test_fused_qkv_and_torchao_float8_leave_a_quantized_transformer_as_it_is(tmp_path, files):
    from pipeline.speed.acceleration import Applied, apply_fuse_qkv, float8_filter

    for name in ("fp8_scaled", "gguf"):
        pipe = load_base_pipeline(get_preset("tiny"), tmp_path, torch.device("cpu"),
                                  weight_files=WeightFiles(transformer=files[name]))
        applied = Applied()
        apply_fuse_qkv(pipe, applied)
        assert not applied.fused_qkv and "held quantized" in applied.notes[-1]
        assert quantized_layers(pipe.transformer)
    float8 = Float8Linear(torch.zeros(32, 32, dtype=torch.float8_e4m3fn), None, None, torch.bfloat16)
    assert float8_filter(torch.nn.Linear(32, 32), "blocks.0.attn1.to_q")  # a size torchao takes...
    assert not float8_filter(float8, "blocks.0.attn1.to_q")  # ...but already float8: left alone


def test_what_was_loaded_is_described_for_the_banner(files):
    model = load_transformer_file(files["gguf"], CONFIG, torch.float32)
    info = loaded_file_of(model)
    assert info.as_dict()["path"] == str(files["gguf"]) and info.file_bytes == files["gguf"].stat().st_size
    assert info.memory_bytes == module_bytes(model)
    assert info.describe() == (f"transformer from q8.gguf (gguf, original Wan keys; float32 x 85, Q8_0 x 2): GGUF "
                               f"Q8_0 Linear weights, compute float32, {module_bytes(model) / 2**20:.2f} MiB in memory")


def test_a_dtype_cast_of_the_model_keeps_float8_weights_float8(files):
    model = load_transformer_file(files["fp8_scaled"], CONFIG, torch.float32)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    model.to(torch.bfloat16)
    for name, weight in before.items():
        layer = model.get_submodule(name)
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.compute_dtype == torch.bfloat16
        assert torch.equal(layer.weight.view(torch.uint8), weight.view(torch.uint8))  # the same float8 values
        assert layer(torch.ones(1, layer.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16
