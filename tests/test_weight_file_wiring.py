"""Single weight files as an operator uses them (issue 18): --transformer-file / --text-encoder-file (and their
settings) on every command, a video from each layout through the CLI, bad files refused in one line naming the file,
`weights fetch` / `verify` of these files, the banner and /ready naming what was loaded, a worker that cannot load
one failing without a restart loop, and LoRAs kept unfused before compiling on a quantized base."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from fastapi.testclient import TestClient

import pipeline.generator as generator_module
from benchmarks.harness import ServeProcess
from particalize.cli import _settings, build_parser, main
from particalize.compose import weight_files
from particalize.compose_server import build_app
from particalize.settings import Settings
from pipeline.errors import WeightsMissing
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.lora.stack import LoraStackOptions
from pipeline.presets import get_preset
from pipeline.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_components
from pipeline.video import read_mp4
from pipeline.weight_files.files import WeightFiles
from pipeline.weight_files.loaded_file import loaded_file_of
from tests.checkpoint_files import (
    gguf_quantized_keys,
    linear_weights,
    transformer_state,
    write_fp8_transformer,
    write_gguf,
    write_text_encoder,
    write_transformer,
)
from tests.conftest import make_settings
from tests.images import noise_image
from tests.lora_files import make_weights, write_lora
from weights.manifest import FileRecord, sha256_of, write_manifest
from weights.single_file import files_dir

TINY_FLAGS = ["--model", "tiny", "--num-frames", "5", "--steps", "2", "--width", "32", "--height", "32",
              "--seed", "4", "--prompt", "a glass dog shatters"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny transformer in every layout the issue names, the tiny text encoder as bf16 and fp8 scaled, and a
    GGUF of another (two-block) Wan transformer."""
    d = tmp_path_factory.mktemp("weight-files")
    components = build_tiny_components()
    tiny = components["transformer"]
    state, linear = transformer_state(tiny), linear_weights(tiny)
    other = WanTransformer3DModel.from_config({**TINY_TRANSFORMER_CONFIG, "num_layers": 1})
    other_state = transformer_state(other)
    noise_image(32, 32).save(d / "in.png")
    return {
        "image": d / "in.png",
        "original_fp32": write_transformer(d / "original.safetensors", state),
        "comfyui_bf16": write_transformer(d / "comfy_bf16.safetensors", state, torch.bfloat16, "comfyui"),
        "fp8": write_fp8_transformer(d / "fp8.safetensors", state, linear)[0],
        "fp8_scaled": write_fp8_transformer(d / "fp8s.safetensors", state, linear, scaled="scale_weight")[0],
        "gguf_q8_0": write_gguf(d / "q8.gguf", state, gguf_quantized_keys(state, linear, tiny._keep_in_fp32_modules)),
        "te_bf16": write_text_encoder(d / "umt5_bf16.safetensors", components["text_encoder"])[0],
        "te_fp8_scaled": write_text_encoder(d / "umt5_fp8s.safetensors", components["text_encoder"], scaled=True)[0],
        "other_gguf": write_gguf(d / "wan_other.gguf", other_state, set()),
    }


def cli_video(tmp_path: Path, files: dict[str, Path], name: str, *flags: str) -> np.ndarray:
    out = tmp_path / f"{name}.mp4"
    assert main(["generate", "--image", str(files["image"]), "--out", str(out), *TINY_FLAGS, *flags]) == 0
    meta, frames = read_mp4(out)
    assert frames.shape[:3] == (5, 32, 32)
    return frames


# --- settings and flags --------------------------------------------------------------------------------------------

def test_every_command_takes_both_files_by_flag_or_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("PARTICALIZE_TEXT_ENCODER_FILE", "hf://Comfy-Org/Wan_2.1_ComfyUI_repackaged/split_files/"
                                                          "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    for command in (["generate", "--image", "x.png"], ["batch", "j.jsonl", "--out", "o"], ["serve"], ["worker"],
                    ["weights", "fetch"], ["weights", "verify"]):
        settings = _settings(build_parser().parse_args([*command, "--transformer-file", "/m/wan_q8.gguf"]))
        assert settings.transformer_file == "/m/wan_q8.gguf", command
        assert settings.text_encoder_file.endswith("umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    monkeypatch.delenv("PARTICALIZE_TEXT_ENCODER_FILE")
    assert Settings(transformer_file="").transformer_file is None
    with pytest.raises(ValueError, match="PARTICALIZE_TRANSFORMER_FILE: .*only huggingface.co file URLs"):
        Settings(transformer_file="https://example.com/wan.gguf")


def test_a_configured_file_reaches_the_generator_options_as_a_local_path(tmp_path, files):
    from particalize.compose import generator_options

    options = generator_options(make_settings(tmp_path, transformer_file=str(files["gguf_q8_0"]),
                                              weights_dir=tmp_path))
    assert options.weight_files == WeightFiles(transformer=files["gguf_q8_0"])
    fetched = files_dir(tmp_path, "o/r") / "t.gguf"
    fetched.parent.mkdir(parents=True)
    fetched.write_bytes(files["gguf_q8_0"].read_bytes())
    hub = make_settings(tmp_path, weights_dir=tmp_path, text_encoder_file="hf://o/r/t.gguf")
    assert weight_files(hub) == WeightFiles(text_encoder=fetched)


# --- a video from each layout, through the CLI ---------------------------------------------------------------------

def test_cli_generate_from_every_transformer_layout(tmp_path, files, capsys):
    plain = cli_video(tmp_path, files, "plain")
    videos = {name: cli_video(tmp_path, files, name, "--transformer-file", str(files[name]))
              for name in ("original_fp32", "comfyui_bf16", "fp8", "fp8_scaled", "gguf_q8_0")}
    np.testing.assert_array_equal(videos["original_fp32"], plain)  # lossless: the plain run's frames exactly
    for name, frames in videos.items():  # bf16 (8 bits of mantissa), fp8 and Q8_0: near the tiny model's video
        assert np.abs(frames.astype(float) - plain).mean() < 40, name


def test_cli_generate_with_a_text_encoder_file(tmp_path, files):
    plain = cli_video(tmp_path, files, "plain")
    for name in ("te_bf16", "te_fp8_scaled"):
        frames = cli_video(tmp_path, files, name, "--text-encoder-file", str(files[name]))
        assert np.abs(frames.astype(float) - plain).mean() < 40, name


@pytest.mark.parametrize("flags, says", [
    (["--transformer-file", "{dir}/gone.gguf"], "--transformer-file names {dir}/gone.gguf, which is not a file"),
    (["--transformer-file", "hf://city96/Wan2.1-I2V-14B-480P-gguf/wan2.1-i2v-14b-480p-Q8_0.gguf"],
     "is not on disk at .*: fetch it with `particalize weights fetch --skip-model --transformer-file hf://city96"),
    (["--transformer-file", "{te_bf16}"], "transformer file umt5_bf16.safetensors: not a Wan2.1 transformer"),
    (["--transformer-file", "{other_gguf}"], "wan_other.gguf does not fit the preset's transformer: the file holds "
                                             "a transformer of width 24, 1 blocks"),
    (["--text-encoder-file", "{fp8}"], "fp8.safetensors does not fit the preset's UMT5 text encoder"),
    (["--text-encoder-file", "{gguf_q8_0}"], "q8.gguf: a text encoder is read from .safetensors only"),
])
def test_a_bad_file_is_one_line_naming_it_and_what_to_fix(tmp_path, files, capsys, flags, says):
    values = {k: str(v) for k, v in files.items()} | {"dir": str(tmp_path)}
    code = main(["generate", "--image", str(files["image"]), "--out", str(tmp_path / "x.mp4"), *TINY_FLAGS,
                 "--weights-dir", str(tmp_path), *[f.format(**values) for f in flags]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "x.mp4").exists()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert re.search(says.format(**values), err), err


# --- weights fetch / verify ----------------------------------------------------------------------------------------

def test_weights_verify_checks_a_fetched_file_against_its_size_and_sha256(tmp_path, files, capsys):
    target = files_dir(tmp_path, "o/r") / "split" / "wan.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(files["gguf_q8_0"].read_bytes())
    write_manifest(files_dir(tmp_path, "o/r"), "o/r", "c" * 40,
                   [FileRecord("split/wan.gguf", target.stat().st_size, sha256_of(target))])
    verify = ["weights", "verify", "--model", "tiny", "--weights-dir", str(tmp_path),
              "--transformer-file", "hf://o/r/split/wan.gguf", "--text-encoder-file", str(files["te_bf16"])]
    assert main(verify) == 0
    assert f"{target}: ok" in capsys.readouterr().out
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    assert main(verify) == 1
    assert f"{target}: sha256 differs from the hub's" in capsys.readouterr().out
    assert main([*verify, "--quick"]) == 0  # sizes only
    target.write_bytes(bytes(data[:-10]))
    assert main([*verify, "--quick"]) == 1
    assert f"{target}: size {len(data) - 10}, expected {len(data)}" in capsys.readouterr().out


def test_weights_fetch_fetches_the_hub_files_and_says_what_to_do_offline(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    fetched = []

    def fake(source, weights_dir, token=None):
        fetched.append(source.text)
        return files_dir(weights_dir, source.repo) / source.file

    monkeypatch.setattr("weights.fetch.fetch_single_file", fake)
    args = ["weights", "fetch", "--skip-model", "--weights-dir", str(tmp_path), "--transformer-file",
            "hf://city96/Wan2.1-I2V-14B-480P-gguf/wan2.1-i2v-14b-480p-Q8_0.gguf", "--text-encoder-file", "/m/te.sft"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert fetched == ["hf://city96/Wan2.1-I2V-14B-480P-gguf/wan2.1-i2v-14b-480p-Q8_0.gguf"]
    assert "fetched transformer file hf://city96" in out and "text encoder file /m/te.sft: a local file" in out
    monkeypatch.undo()

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot fetch hf://city96" in err and "download the file elsewhere" in err


# --- banner, /ready, a worker that cannot load -----------------------------------------------------------------------

def test_the_banner_names_each_file_its_format_and_memory(tmp_path, files):
    from particalize.cli_server import describe_environment

    settings = make_settings(tmp_path, workers=1, transformer_file=str(files["gguf_q8_0"]),
                             text_encoder_file=str(files["te_fp8_scaled"]))
    _, lines, problem = describe_environment(settings, model_is_explicit=True)
    assert problem is None
    (transformer,) = [line for line in lines if line.startswith("transformer file: ")]
    assert f"{files['gguf_q8_0']} (gguf, gguf_Q8_0; F32 x 85, Q8_0 x 2;" in transformer and "in memory" in transformer
    (encoder,) = [line for line in lines if line.startswith("text encoder file: ")]
    assert "(safetensors, fp8_scaled; float8_e4m3fn x" in encoder and "on disk" in encoder
    missing = make_settings(tmp_path, workers=1, transformer_file=str(tmp_path / "gone.gguf"))
    assert "gone.gguf, which is not a file" in describe_environment(missing, model_is_explicit=True)[2]
    noise = make_settings(tmp_path, workers=1, model="wan2.1-i2v-14b-480p", random_weights=True,
                          transformer_file=str(files["gguf_q8_0"]))
    assert "--random-weights builds every component in code" in describe_environment(noise, True)[2]


def test_the_banners_memory_is_what_the_loaded_file_takes(tmp_path, files):
    from pipeline.weight_files.summary import summarize

    for name in ("fp8_scaled", "gguf_q8_0", "comfyui_bf16"):
        gen = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path,
                                              weight_files=WeightFiles(transformer=files[name])))
        loaded = loaded_file_of(gen.pipe.transformer)
        assert gen.loaded_files == [loaded]
        estimate = summarize(files[name], "transformer", dict(TINY_TRANSFORMER_CONFIG), torch.float32)
        assert estimate.memory_bytes == loaded.memory_bytes, name


def test_ready_names_the_loaded_files_and_a_worker_that_cannot_load_says_why(tmp_path, files):
    from particalize.compose_server import open_storage
    from particalize.core_options import GeneratorFactory, worker_options
    from server.processes.exit_codes import EXIT_LOAD_FAILED
    from server.worker import run_worker

    good = make_settings(tmp_path / "good", transformer_file=str(files["gguf_q8_0"]))
    stop = threading.Event()
    stop.set()  # register, then stop at once
    assert run_worker(worker_options(good), open_storage(good), GeneratorFactory(good), stop) == 0
    with TestClient(build_app(good)) as client:
        (worker,) = client.app.state.services.store.workers.all()
    assert "; weight files: transformer from q8.gguf (gguf, original Wan keys; float32 x 85, Q8_0 x 2): GGUF Q8_0 " \
           "Linear weights, compute float32" in worker.detail
    assert "in memory" in worker.detail

    bad = make_settings(tmp_path / "bad", transformer_file=str(files["te_bf16"]))
    assert run_worker(worker_options(bad), open_storage(bad), GeneratorFactory(bad), threading.Event()) \
        == EXIT_LOAD_FAILED
    with TestClient(build_app(bad)) as client:
        answer = client.get("/ready")
    assert answer.status_code == 503
    assert "failed to load its model: transformer file umt5_bf16.safetensors: not a Wan2.1 transformer" in answer.text


def test_serve_with_a_transformer_file_shows_it_in_ready_and_a_bad_one_is_not_restarted(tmp_path, files):
    serve = ServeProcess(tmp_path / "good", env={"PARTICALIZE_TRANSFORMER_FILE": str(files["fp8_scaled"])})
    try:
        serve.wait_ready()
        ready = serve.http.get("/ready").json()
        (loaded,) = ready["loaded"]
        assert "weight files: transformer from fp8s.safetensors (safetensors, ComfyUI (model.diffusion_model.) " \
               "keys" in loaded["detail"] and "float8_e4m3fn Linear weights (scaled)" in loaded["detail"]
        assert f"transformer file: {files['fp8_scaled']} (safetensors, fp8_scaled;" in serve.log_text()
    finally:
        serve.stop()
    bad = ServeProcess(tmp_path / "bad", env={"PARTICALIZE_TRANSFORMER_FILE": str(files["other_gguf"])})
    try:
        bad.wait_up()
        deadline = time.monotonic() + 90
        while "failed to load" not in (answer := bad.http.get("/ready")).text and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answer.status_code == 503 and "wan_other.gguf does not fit the preset's transformer" in answer.text
        time.sleep(1.0)
        log = bad.log_text()
        assert "could not load the model" in log and "it is not restarted" in log
        assert log.count("cannot load model") == 1  # one try: no restart loop
        assert "Traceback" not in log
    finally:
        bad.stop()


# --- LoRAs on a quantized base under compile --------------------------------------------------------------------------

def test_the_auto_fuse_before_compiling_keeps_the_lora_unfused_on_a_gguf_base(tmp_path, files, monkeypatch):
    lora = write_lora(tmp_path / "style.safetensors", make_weights(build_tiny_components()["transformer"]), "kohya")
    monkeypatch.setattr(generator_module, "resolve_compile", lambda speed, device: (True, None))  # as on CUDA

    def generator(base: str) -> VideoGenerator:
        return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path, loras=LoraStackOptions(((lora, 1.0),)),
                                               weight_files=WeightFiles(transformer=files[base])))

    on_gguf = generator("gguf_q8_0")
    assert not on_gguf.lora.fused
    assert any("LoRAs kept unfused on the quantized transformer" in note for note in on_gguf.applied.notes)
    on_bf16 = generator("comfyui_bf16")
    assert on_bf16.lora.fused and not any("kept unfused" in n for n in on_bf16.applied.notes)


def test_a_missing_hub_file_is_weights_missing_naming_the_fetch(tmp_path):
    with pytest.raises(WeightsMissing, match=r"PARTICALIZE_TEXT_ENCODER_FILE.*weights fetch --skip-model "
                                             r"--text-encoder-file hf://o/r/umt5.safetensors"):
        weight_files(make_settings(tmp_path, weights_dir=tmp_path, text_encoder_file="hf://o/r/umt5.safetensors"))


def test_weights_verify_of_a_directory_needs_no_weights_for_the_component_a_file_replaces(tmp_path, files, capsys):
    from diffusers import WanImageToVideoPipeline

    model = tmp_path / "wan-dir"
    WanImageToVideoPipeline(**build_tiny_components()).save_pretrained(model)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    verify = ["weights", "verify", "--model", str(model), "--weights-dir", str(tmp_path)]
    assert main(verify) == 1
    assert "transformer/diffusion_pytorch_model.safetensors: missing" in capsys.readouterr().out
    assert main([*verify, "--transformer-file", str(files["gguf_q8_0"])]) == 0
    out = capsys.readouterr().out
    assert f"{model}: ok" in out and f"{files['gguf_q8_0']}: ok" in out


def test_an_explicit_fuse_on_a_gguf_base_is_refused_in_one_line_saying_what_to_do(tmp_path, files, capsys):
    lora = write_lora(tmp_path / "style.safetensors", make_weights(build_tiny_components()["transformer"]), "kohya")
    code = main(["generate", "--image", str(files["image"]), "--out", str(tmp_path / "x.mp4"), *TINY_FLAGS,
                 "--transformer-file", str(files["gguf_q8_0"]), "--lora", str(lora), "--fuse-lora"])
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # after the log lines of the loading
    assert code == 2 and err.startswith("error: ") and "Traceback" not in stderr and not (tmp_path / "x.mp4").exists()
    assert "hold GGUF Q8_0 weights" in err and "Keep the LoRAs unfused: leave PARTICALIZE_FUSE_LORA / --fuse-lora " \
                                               "off" in err
