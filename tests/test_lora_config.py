"""The LoRA stack and fast mode as an operator and a client see them: settings, CLI, weights, banner, API, /ready."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from particalize.cli import _settings, build_parser, main
from particalize.compose import lora_sources
from particalize.compose_server import build_app
from particalize.settings import Settings
from pipeline.errors import WeightsMissing
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.lora.stack import LoraStackOptions
from pipeline.presets import get_preset
from pipeline.video import read_mp4
from tests.conftest import make_settings
from tests.images import noise_image, png_bytes
from tests.lora_files import make_diffs, make_weights, write_lora
from tests.test_api import RUN, SMALL, Api, assert_error, run_worker_once
from weights.locate import stack_files, stack_sources
from weights.lora_sources import parse_lora_list, parse_lora_source


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("loras")
    transformer = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp)).pipe.transformer
    (tmp / "a").mkdir()
    return (write_lora(tmp / "a" / "style.safetensors", make_weights(transformer, seed=1), "kohya"),
            write_lora(tmp / "second.safetensors", make_weights(transformer, rank=2, seed=2), "diffusers"),
            write_lora(tmp / "distill.safetensors", make_weights(transformer, seed=3), "original_down_up_alpha",
                       make_diffs(transformer)))


# --- writing the list ---------------------------------------------------------------------------------------------

def test_sources_are_paths_or_hub_files_each_with_an_optional_strength():
    assert parse_lora_source("/m/a.safetensors:0.8") == parse_lora_source("/m/a.safetensors", 0.8)
    local = parse_lora_source("~/m/a.safetensors")
    assert local.path == Path("~/m/a.safetensors").expanduser() and local.strength == 1.0 and not local.is_hub
    hub = parse_lora_source("hf://lightx2v/Wan2.1-Distill-Loras@abc123/sub/x.safetensors:0.5")
    assert (hub.repo, hub.file, hub.revision, hub.strength) == ("lightx2v/Wan2.1-Distill-Loras", "sub/x.safetensors",
                                                                 "abc123", 0.5)
    assert [s.strength for s in parse_lora_list("/a.safetensors:0.3, hf://o/r/b.safetensors", 0.7)] == [0.3, 0.7]
    for bad, says in [("/a.safetensors:strong", "not a number"), ("/a.safetensors:9", "between 0 and 4"),
                      ("hf://only/repo", "hf://owner/repo/file.safetensors")]:
        with pytest.raises(ValueError, match=says):
            parse_lora_source(bad)


def test_settings_stack_lora_path_first_then_loras_and_check_fast_mode(tmp_path):
    settings = Settings(weights_dir=tmp_path, lora_path=tmp_path / "p.safetensors", lora_strength=0.9,
                        loras="/m/b.safetensors:0.4,hf://o/r/c.safetensors")
    assert [(s.text, s.strength) for s in stack_sources(lora_sources(settings))] == [
        (str(tmp_path / "p.safetensors"), 0.9), ("/m/b.safetensors", 0.4), ("hf://o/r/c.safetensors", 0.9)]
    with pytest.raises(ValueError, match="PARTICALIZE_LORAS: LoRA entry '/m/b:x'"):
        Settings(loras="/m/b:x")
    with pytest.raises(ValueError, match="PARTICALIZE_MODE=fast needs .* PARTICALIZE_SPEED_LORA"):
        Settings(mode="fast")
    with pytest.raises(WeightsMissing, match="PARTICALIZE_LORAS.*particalize weights fetch"):  # not fetched yet
        stack_files(lora_sources(Settings(weights_dir=tmp_path, loras="hf://o/r/c.safetensors")))


def test_cli_lora_is_repeatable_and_replaces_the_configured_stack(monkeypatch, tmp_path):
    monkeypatch.setenv("PARTICALIZE_LORA_PATH", str(tmp_path / "env.safetensors"))
    for command in (["generate", "--image", "x.png"], ["batch", "j.jsonl", "--out", "o"], ["serve"], ["worker"]):
        args = build_parser().parse_args([*command, "--lora", "/m/a.safetensors:0.5", "--lora", "hf://o/r/b.safetensors",
                                          "--lora-strength", "0.7", "--speed-lora", "/m/s.safetensors", "--mode",
                                          "fast", "--no-lora-strict"])
        settings = _settings(args)
        assert settings.lora_path is None and settings.speed_lora == "/m/s.safetensors" and settings.mode == "fast"
        assert [(s.text, s.strength) for s in stack_sources(lora_sources(settings))] == [
            ("/m/a.safetensors", 0.5), ("hf://o/r/b.safetensors", 0.7)]
        assert settings.lora_strict is False


def test_cli_generate_stacks_loras_and_runs_fast_mode(tmp_path, files, capsys):
    noise_image(32, 32).save(tmp_path / "in.png")
    out = tmp_path / "out.mp4"
    code = main(["generate", "--model", "tiny", "--image", str(tmp_path / "in.png"), "--out", str(out),
                 "--num-frames", "5", "--seed", "3", "--lora", f"{files[0]}:0.8", "--lora", str(files[1]),
                 "--speed-lora", str(files[2]), "--mode", "fast"])
    assert code == 0
    printed = capsys.readouterr().out
    assert '"mode": "fast"' in printed and '"steps": 4' in printed and '"scale": 1.0' in printed
    assert read_mp4(out)[1].shape[0] == 5


def test_a_batch_row_may_sweep_the_mode(tmp_path):
    from particalize.batch_plan import expand_row
    from pipeline.params import Limits

    noise_image(32, 32).save(tmp_path / "in.png")
    row = '{"id": "dog", "image": "in.png", "mode": ["normal", "fast"], "seed": 3}'
    jobs = expand_row(1, row, tmp_path, Limits(fast_mode=True), {})
    assert [(j.key, j.params.mode) for j in jobs] == [("dog_modenormal", "normal"), ("dog_modefast", "fast")]
    with pytest.raises(Exception, match=r"\[mode\].*PARTICALIZE_SPEED_LORA"):
        expand_row(1, row, tmp_path, Limits(), {})


# --- weights fetch / verify cover every LoRA ------------------------------------------------------------------------

def test_weights_fetch_fetches_every_hub_lora_of_the_stack_and_the_speed_lora(monkeypatch, tmp_path, capsys):
    import weights.fetch

    fetched = []

    def fake_fetch(repo, file, weights_dir, revision=None, token=None):
        fetched.append((repo, file, revision))
        return weights_dir / "lora" / file

    monkeypatch.setattr(weights.fetch, "fetch_lora", fake_fetch)
    code = main(["weights", "fetch", "--skip-model", "--weights-dir", str(tmp_path), "--lora", "/m/local.safetensors",
                 "--lora", "hf://someone/style/s.safetensors:0.5",
                 "--speed-lora", "hf://lightx2v/Wan2.1-Distill-Loras@v1/wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors"])
    assert code == 0
    assert fetched == [("someone/style", "s.safetensors", None),
                       ("lightx2v/Wan2.1-Distill-Loras", "wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors", "v1")]
    assert "/m/local.safetensors: a local file" in capsys.readouterr().out


def test_weights_verify_checks_every_lora_and_names_a_broken_one(tmp_path, files, capsys):
    broken = tmp_path / "broken" / "b.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(files[1].read_bytes()[:100])
    code = main(["weights", "verify", "--model", "tiny", "--lora", str(files[0]), "--lora", str(broken),
                 "--speed-lora", str(files[2])])
    printed = capsys.readouterr().out
    assert code == 1
    assert f"{files[0].parent}: ok" in printed and f"{files[2].parent}: ok" in printed
    assert f"{broken.parent}: FAILED" in printed and "not a readable safetensors file" in printed


# --- start-up banner and /ready ---------------------------------------------------------------------------------------

def test_the_banner_lists_the_stack_and_the_speed_lora(tmp_path, files):
    from particalize.cli_server import describe_environment

    settings = make_settings(tmp_path, workers=1, loras=f"{files[0]}:0.8,{files[1]}", speed_lora=str(files[2]))
    _, lines, problem = describe_environment(settings, model_is_explicit=True)
    assert problem is None
    assert f"LoRA 1: {files[0]} (strength 0.8)" in lines and f"LoRA 2: {files[1]} (strength 1)" in lines
    assert any(line.startswith(f"speed LoRA (fast mode): {files[2]}") and "4 steps, scale 1" in line for line in lines)
    missing = make_settings(tmp_path, workers=1, loras=str(tmp_path / "gone.safetensors"))
    assert "gone.safetensors" in describe_environment(missing, model_is_explicit=True)[2]


# --- the API -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fast_generator(tmp_path_factory: pytest.TempPathFactory, files) -> VideoGenerator:
    stack = LoraStackOptions(loras=((files[0], 1.0),), speed_lora=(files[2], 1.0))
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path_factory.mktemp("w"), loras=stack))


def test_fast_mode_on_a_server_without_a_speed_lora_is_refused_in_the_error_shape(tmp_path):
    with TestClient(build_app(make_settings(tmp_path))) as client:
        api = Api(client)
        answer = client.post(RUN, json={"inputImageUrl": "http://127.0.0.1:9/dog.png", **SMALL, "mode": "fast"})
        assert_error(answer, 0, contains="Request parameter [mode] must be 'normal' on this server (fast mode needs a "
                                         "speed LoRA")
        assert_error(client.post(RUN, json={"inputImageUrl": "http://127.0.0.1:9/d.png", "mode": "turbo"}), 0,
                     contains="[mode]")
        assert api.task_count() == 0
        tool = client.post("/v1/Tool/Detail", json={"slugowner": "codexq", "slugproject": "particalize"}).json()
        assert "mode" not in {item["id"] for group in tool["tool"][0]["parameters"] for item in group["items"]}


def test_fast_mode_through_the_api_documented_in_tool_detail(tmp_path, files, fast_generator):
    settings = make_settings(tmp_path, speed_lora=str(files[2]))
    with TestClient(build_app(settings)) as client:
        api = Api(client)
        tool = client.post("/v1/Tool/Detail", json={"slugowner": "codexq", "slugproject": "particalize"}).json()
        advanced = tool["tool"][0]["parameters"][-1]
        (mode,) = advanced["items"]
        assert advanced["title"] == "Advanced" and mode["advanced"] is True and mode["required"] is False
        assert mode["id"] == "mode" and mode["default"] == "normal"
        assert [o["value"] for o in mode["options"]] == ["normal", "fast"] and "4 steps" in mode["description"]
        run = client.post(RUN, data={**SMALL, "mode": "fast"},
                          files={"inputImage": ("in.png", png_bytes(32, 32), "image/png")}).json()
        assert run["result"] is True
        assert run_worker_once(client, settings, fast_generator)
        task = api.detail(taskid=run["taskid"])["tasklist"][0]
        assert task["pexit"] == "0", task["debugerror"]
        assert {k: task["parameters"][k] for k in ("mode", "steps", "scale", "flowShift")} == {
            "mode": "fast", "steps": "4", "scale": "1.0", "flowShift": "5.0"}
        path = Path(settings.outputs_dir) / task["uuid"] / "0.mp4"
        assert read_mp4(path)[1].shape[:3] == (9, 32, 32)


def test_ready_lists_what_each_worker_loaded(tmp_path, fast_generator):
    from particalize.compose_server import open_storage
    from particalize.core_options import worker_options
    from server.worker import run_worker

    settings = make_settings(tmp_path)
    stop = threading.Event()
    stop.set()  # register, then stop at once
    assert run_worker(worker_options(settings), open_storage(settings), lambda: fast_generator, stop) == 0
    with TestClient(build_app(settings)) as client:
        (worker,) = client.app.state.services.store.workers.all()
    assert "style.safetensors as 'style', strength 1" in worker.detail
    assert "distill.safetensors as 'speed_distill'" in worker.detail and "fast mode only" in worker.detail
    assert lora_sources(Settings(speed_lora="/x.safetensors:0.5")).speed_lora.strength == 0.5
