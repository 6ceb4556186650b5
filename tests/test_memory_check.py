"""Memory is checked before anything is built: the arithmetic of need against free, which options are named, the
tiny preset always passing, transformer files sized by their format, and the real-size preset refused in seconds by
`particalize generate` on this machine."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import NotEnoughMemory
from pipeline.memory_check import (
    WAN_14B_SHAPE,
    ModelShape,
    Setup,
    Sizes,
    activation_bytes,
    check_memory,
    judge,
    need_of,
    transformer_file_format,
    video_bytes,
)
from pipeline.presets import get_preset
from pipeline.random_weights import WAN_I2V_14B_TRANSFORMER
from pipeline.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_pipeline
from pipeline.weight_files.memory import GIB, HEADROOM_480P_GIB, text_encoder_bytes

ROOT = Path(__file__).resolve().parents[1]


class FakeSizes:
    """Round component sizes (GiB) in place of the meta-device figures, so each expectation can be added by hand."""

    compute_dtype = torch.bfloat16
    TRANSFORMER = {"bf16": 31, "fp8": 16, "fp8_scaled": 16, "gguf_Q8_0": 17, "gguf_Q6_K": 13, "gguf_Q5_K": 11,
                   "gguf_Q4_K": 9, "gguf_Q3_K": 7}

    def transformer(self, fmt: str) -> int:
        return self.TRANSFORMER[fmt] * GIB

    def text_encoder(self, fmt: str) -> int:
        return {"bf16": 11, "fp8": 6, "fp8_scaled": 6}[fmt] * GIB

    def clip_and_vae(self) -> int:
        return 3 * GIB


ACT = (9 * GIB, "activations")


@pytest.fixture(scope="module")
def tiny_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved as a local diffusers directory (what `--model /path` points at)."""
    target = tmp_path_factory.mktemp("tiny") / "wan-local"
    build_tiny_pipeline().save_pretrained(target)
    return target


def gib(n: float) -> int:
    return int(n * GIB)


def test_the_need_is_the_components_placed_plus_the_activations():
    on_gpu = need_of(Setup("cuda"), FakeSizes(), ACT)
    assert sum(on_gpu.device.values()) == gib(31 + 11 + 3 + 9) and on_gpu.ram == {}
    on_cpu = need_of(Setup("cpu"), FakeSizes(), ACT)
    assert on_cpu.device == {} and sum(on_cpu.ram.values()) == gib(31 + 11 + 3 + 9)


def test_with_the_text_encoder_on_the_cpu_or_float8_the_load_is_the_peak():
    """The loader places the whole model on the GPU before float8 or the text encoder's move: 45 GiB at load."""
    te_cpu = need_of(Setup("cuda", text_encoder_on_cpu=True), FakeSizes(), ACT)
    assert sum(te_cpu.device.values()) == gib(31 + 11 + 3) and "loading" in te_cpu.when
    float8 = need_of(Setup("cuda", float8=True, text_encoder_on_cpu=True), FakeSizes(), ACT)
    assert sum(float8.device.values()) == gib(31 + 11 + 3), "the bf16 transformer is placed before float8"
    gguf = need_of(Setup("cuda", transformer="gguf_Q4_K", text_encoder_on_cpu=True), FakeSizes(), ACT)
    assert sum(gguf.device.values()) == gib(9 + 11 + 3) and "loading" in gguf.when, "the load (23) beats the run (21)"
    assert sum(gguf.ram.values()) == gib(11)


def test_offload_needs_little_gpu_but_the_whole_model_in_ram():
    model = need_of(Setup("cuda", memory_mode="model_cpu_offload"), FakeSizes(), ACT)
    assert sum(model.device.values()) == gib(31 + 9), "one model (the largest) at a time, plus activations"
    group = need_of(Setup("cuda", memory_mode="group_offload"), FakeSizes(), ACT)
    assert sum(group.device.values()) == gib(3 + 1 + 9)
    sequential = need_of(Setup("cuda", memory_mode="sequential_cpu_offload"), FakeSizes(), ACT)
    assert sum(sequential.device.values()) == gib(9)
    for need in (model, group, sequential):
        assert sum(need.ram.values()) == gib(31 + 11 + 3)


def test_a_fitting_configuration_passes_and_names_nothing():
    verdict = judge(Setup("cuda"), FakeSizes(), ACT, gib(80), gib(64), float8_ok=True)
    assert verdict.ok and verdict.fitting == []


def test_a_24_gib_gpu_is_told_the_offload_modes_and_the_most_precise_transformer_file_that_fit():
    verdict = judge(Setup("cuda"), FakeSizes(), ACT, gib(23.5), gib(64), float8_ok=True)
    assert not verdict.ok
    named = [n.setup for n in verdict.fitting]
    assert Setup("cuda", float8=True) not in named, "float8 is applied after a bf16 load that does not fit"
    assert Setup("cuda", text_encoder_on_cpu=True) not in named
    modes = {s.memory_mode for s in named}
    assert {"group_offload", "sequential_cpu_offload"} <= modes and "model_cpu_offload" not in modes, \
        "model offload still holds the 31 GiB transformer (+9) on the GPU"
    files = [s for s in named if s.transformer != "bf16"]
    assert files == [Setup("cuda", transformer="gguf_Q4_K", text_encoder_on_cpu=True)], \
        "only the most precise file that fits: with the text encoder on the CPU, a 9 GiB one loads in 9+11+3"
    message = verdict.message("wan2.1-i2v-14b-480p", torch.device("cuda:0"))
    assert "≈54.0 GiB on cuda:0" in message and "23.5 GiB is free" in message
    assert "PARTICALIZE_MEMORY_MODE=group_offload" in message and "GGUF Q4_K transformer file" in message
    assert "PARTICALIZE_FLOAT8" not in message and "transformer (bfloat16) 31.0 GiB" in message


def test_offload_is_not_named_when_ram_cannot_hold_the_model():
    verdict = judge(Setup("cuda"), FakeSizes(), ACT, gib(23.5), gib(20), float8_ok=True)
    assert all(n.setup.memory_mode == "none" for n in verdict.fitting)


def test_on_a_gpu_that_holds_the_load_float8_and_the_cpu_text_encoder_are_named():
    verdict = judge(Setup("cuda"), FakeSizes(), ACT, gib(47), gib(64), float8_ok=True)
    named = [n.setup for n in verdict.fitting]
    assert Setup("cuda", float8=True) in named and Setup("cuda", text_encoder_on_cpu=True) in named
    assert judge(Setup("cuda"), FakeSizes(), ACT, gib(47), gib(64), float8_ok=False).fitting[0].setup \
        == Setup("cuda", text_encoder_on_cpu=True), "float8 is named only where it can be applied"


def test_when_nothing_fits_the_message_says_so_with_the_smallest():
    verdict = judge(Setup("cpu"), FakeSizes(), ACT, 0, gib(22), float8_ok=False)
    assert not verdict.ok and verdict.fitting == []
    message = verdict.message("wan2.1-i2v-14b-480p", torch.device("cpu"))
    assert "None of a GGUF/fp8 transformer file" in message and "GGUF Q3_K" in message and "≈30.0 GiB" in message
    assert "≈54.0 GiB of RAM" in message and "22.0 GiB is available" in message
    assert "PARTICALIZE_MEMORY_CHECK=0" in message


def test_activations_480p_measured_720p_estimated_cpu_doubled_but_the_video():
    assert activation_bytes(480 * 832, "cuda")[0] == int(HEADROOM_480P_GIB * GIB)
    assert "measured" in activation_bytes(480 * 832, "cuda")[1]
    big, how = activation_bytes(720 * 1280, "cuda")
    assert big == int(HEADROOM_480P_GIB * 75_600 / 32_760 * GIB) and "estimate" in how
    video = video_bytes(480 * 832)
    assert video == 2 * 81 * 3 * 480 * 832 * 4
    assert activation_bytes(480 * 832, "cpu")[0] == int(2 * (HEADROOM_480P_GIB * GIB - video) + video), \
        "on the CPU the transformer's working set is float32 (x2); the float32 video is the same bytes"


def test_the_14b_shape_gives_the_measured_token_count():
    assert WAN_14B_SHAPE.tokens(480 * 832) == 32_760 and WAN_14B_SHAPE.tokens(720 * 1280) == 75_600
    assert ModelShape.of(WAN_I2V_14B_TRANSFORMER, None) == WAN_14B_SHAPE


def test_a_small_model_is_charged_its_own_activations_not_the_14bs():
    tiny = ModelShape.of(TINY_TRANSFORMER_CONFIG, {"temperal_downsample": [False, True, True]})
    assert tiny.tokens(480 * 832) == 32_760, "same patch and VAE compression: the same tokens"
    need, how = activation_bytes(480 * 832, "cpu", tiny)
    assert need < 1 * GIB, f"the tiny model at 480P needs {need / GIB:.2f} GiB"
    assert need > video_bytes(480 * 832), "the decoded video is charged whatever the model"
    assert "this model's tokens and widths" in how
    wan_1_3b = ModelShape(12 * 128, 8960, (1, 2, 2))  # Wan2.1 1.3B: 12 heads of 128, FFN 8960
    ratio = activation_bytes(480 * 832, "cuda", wan_1_3b)[0] / activation_bytes(480 * 832, "cuda")[0]
    assert 0.4 < ratio < 0.7, ratio


def test_a_local_directory_is_sized_from_its_own_configs(tmp_path: Path, tiny_directory: Path):
    sizes = Sizes(get_preset(str(tiny_directory)), tmp_path, torch.float32)
    assert sizes.shape.inner_dim == 24 and sizes.shape.ffn_dim == 32
    assert sizes.clip_and_vae() < 16 * 2**20, "the directory's own image encoder and VAE, not ViT-H and Wan's VAE"
    real = Sizes(get_preset("wan2.1-i2v-14b-480p"), tmp_path, torch.float32)
    assert real.shape == WAN_14B_SHAPE and real.clip_and_vae() > 2 * GIB


def test_a_local_tiny_directory_passes_with_8_gib_free_and_the_14b_does_not(monkeypatch, tmp_path: Path,
                                                                            tiny_directory: Path):
    monkeypatch.setattr("pipeline.memory_check.free_ram", lambda: gib(8))
    verdict = check_memory(get_preset(str(tiny_directory)), tmp_path, torch.device("cpu"))
    assert verdict is not None and verdict.ok and verdict.need.total_gib < 2, verdict.need
    with pytest.raises(NotEnoughMemory) as refused:
        check_memory(get_preset("wan2.1-i2v-14b-480p"), tmp_path, torch.device("cpu"))
    assert "activations at 480P" in str(refused.value) and "8.0 GiB is available" in str(refused.value)


def test_the_text_encoder_in_float32_takes_twice_its_bf16_bytes():
    assert text_encoder_bytes("bf16", compute_dtype=torch.float32) == 2 * text_encoder_bytes("bf16")


def test_the_tiny_preset_always_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr("pipeline.memory_check.free_ram", lambda: 0)
    assert check_memory(get_preset("tiny"), tmp_path, torch.device("cpu")) is None


def test_the_real_preset_on_this_machine_is_refused_with_its_float32_need(monkeypatch, tmp_path: Path):
    monkeypatch.setattr("pipeline.memory_check.free_ram", lambda: gib(22))
    with pytest.raises(NotEnoughMemory) as refused:
        check_memory(get_preset("wan2.1-i2v-14b-480p"), tmp_path, torch.device("cpu"))
    text = str(refused.value)
    assert "transformer (float32) 61.1 GiB" in text and "text encoder (float32) 21.2 GiB" in text
    assert "22.0 GiB is available" in text and "None of" in text


def test_transformer_files_are_sized_by_the_format_their_header_says(tmp_path: Path):
    from safetensors.torch import save_file

    weight = torch.zeros(16, 16)
    save_file({"blocks.0.attn1.to_q.weight": weight.bfloat16()}, tmp_path / "bf16.safetensors")
    save_file({"blocks.0.attn1.to_q.weight": weight.to(torch.float8_e4m3fn)}, tmp_path / "fp8.safetensors")
    save_file({"blocks.0.self_attn.q.weight": weight.to(torch.float8_e4m3fn),
               "blocks.0.self_attn.q.scale_weight": torch.ones(1)}, tmp_path / "scaled.safetensors")
    assert [transformer_file_format(tmp_path / f"{n}.safetensors") for n in ("bf16", "fp8", "scaled")] == \
        ["bf16", "fp8", "fp8_scaled"]


def test_generate_refuses_the_real_preset_in_seconds_without_a_traceback(tmp_path: Path):
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 120, 150)).save(tmp_path / "in.png")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "particalize.cli", "generate", "--model", "wan2.1-i2v-14b-480p", "--random-weights",
         "--device", "cpu", "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "out.mp4")],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert "error: Not enough memory to load wan2.1-i2v-14b-480p on cpu" in done.stderr
    assert "Traceback" not in done.stderr
    assert seconds < 60, f"refused after {seconds:.1f}s"
    print(f"generate refused in {seconds:.1f}s")


def test_a_transformer_file_is_counted_in_its_format(monkeypatch, tmp_path: Path):
    from safetensors.torch import save_file

    from pipeline.weight_files.files import WeightFiles

    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(16, 16).to(torch.float8_e4m3fn)}, tmp_path / "t.safetensors")
    monkeypatch.setattr("pipeline.memory_check.free_ram", lambda: gib(22))
    with pytest.raises(NotEnoughMemory) as refused:
        check_memory(get_preset("wan2.1-i2v-14b-480p"), tmp_path, torch.device("cpu"),
                     weight_files=WeightFiles(transformer=tmp_path / "t.safetensors"))
    assert "transformer (fp8 e4m3fn) 15." in str(refused.value), str(refused.value)


def test_generate_counts_the_transformer_file_it_is_given_in_its_format(tmp_path: Path):
    """The check sizes the file the generator would load (--transformer-file), not the preset's bf16 transformer."""
    from PIL import Image
    from safetensors.torch import save_file

    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(16, 16).to(torch.float8_e4m3fn)}, tmp_path / "t.safetensors")
    Image.new("RGB", (64, 48), (90, 120, 150)).save(tmp_path / "in.png")
    done = subprocess.run(
        [sys.executable, "-m", "particalize.cli", "generate", "--model", "wan2.1-i2v-14b-480p", "--device", "cpu",
         "--transformer-file", str(tmp_path / "t.safetensors"), "--image", str(tmp_path / "in.png"),
         "--out", str(tmp_path / "out.mp4")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PARTICALIZE_WEIGHTS_DIR": str(tmp_path / "w")},
    )
    assert done.returncode == 2, done.stderr
    assert "transformer (fp8 e4m3fn) 15." in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.mp4").exists()
