"""Weights on disk: the real loading path reads a local diffusers directory, never a hub; `verify` catches damage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from particalize.compose import lora_sources
from particalize.settings import Settings
from pipeline.errors import WeightsMissing
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.params import GenerationParams
from pipeline.presets import ModelPreset, get_preset
from pipeline.tiny import build_tiny_pipeline
from tests.images import noise_image
from weights.locate import first_lora_file
from weights.manifest import FileRecord, read_manifest, sha256_of, write_manifest
from weights.verify import verify_directory

PARAMS = GenerationParams(width=32, height=32, numFrames=5, steps=2, seed=4)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete diffusers snapshot on disk, as `weights fetch` leaves one (made from the tiny model)."""
    target = tmp_path_factory.mktemp("weights") / "wan-local"
    build_tiny_pipeline().save_pretrained(target)
    files = [p for p in target.rglob("*") if p.is_file()]
    write_manifest(target, "local/tiny", "0" * 40,
                   [FileRecord(str(p.relative_to(target)), p.stat().st_size, sha256_of(p)) for p in files])
    return target


def test_a_local_directory_loads_through_from_pretrained_and_matches_the_in_code_model(snapshot, tmp_path):
    preset = get_preset(str(snapshot))
    assert preset.local_dir == snapshot.resolve()
    from_disk = VideoGenerator(GeneratorOptions(preset, tmp_path)).generate(PARAMS, noise_image(32, 32)).frames
    in_code = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path)).generate(PARAMS, noise_image(32, 32))
    in_code = in_code.frames
    np.testing.assert_allclose(from_disk, in_code, atol=1e-5)


def test_a_small_local_model_generates_where_only_8_gib_are_free(snapshot, tmp_path, monkeypatch):
    """The newcomer's case: the memory check charges a local directory its own model's needs, not the 14B's."""
    monkeypatch.setattr("pipeline.memory_check.free_ram", lambda: 8 * 2**30)
    generator = VideoGenerator(GeneratorOptions(get_preset(str(snapshot)), tmp_path, memory_check=True))
    video = generator.generate(PARAMS, noise_image(32, 32))
    assert video.frames.shape[:3] == (5, 32, 32)


def test_loading_never_reaches_a_hub(snapshot, tmp_path, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("loading opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    VideoGenerator(GeneratorOptions(get_preset(str(snapshot)), tmp_path)).generate(PARAMS, noise_image(32, 32))


def test_a_missing_preset_names_the_file_and_the_fetch_command(tmp_path):
    with pytest.raises(WeightsMissing) as info:
        # the memory check (which refuses this preset on a small machine before any weight is looked for) is off
        VideoGenerator(GeneratorOptions(get_preset("wan2.1-i2v-14b-480p"), tmp_path, memory_check=False))
    message = str(info.value)
    assert str(tmp_path / "wan2.1-i2v-14b-480p" / "model_index.json") in message
    assert "particalize weights fetch --model wan2.1-i2v-14b-480p" in message


def test_a_missing_shard_is_named(snapshot, tmp_path):
    import shutil

    copy = tmp_path / "partial"
    shutil.copytree(snapshot, copy)
    index = copy / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    preset = ModelPreset("partial", None, 3840, local_dir=copy)
    with pytest.raises(WeightsMissing, match="00002-of-00002"):
        VideoGenerator(GeneratorOptions(preset, tmp_path))


def test_verify_passes_a_complete_snapshot_and_catches_a_changed_file(snapshot, tmp_path):
    import shutil

    report = verify_directory(snapshot)
    assert report.ok, report.problems
    assert report.checked == len(read_manifest(snapshot)["files"])

    damaged = tmp_path / "damaged"
    shutil.copytree(snapshot, damaged)
    victim = damaged / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = verify_directory(damaged)
    assert not report.ok
    assert any("sha256" in p and "vae" in p for p in report.problems)
    assert verify_directory(damaged, full_hash=False).ok  # --quick checks sizes only


def test_verify_catches_a_truncated_file(snapshot, tmp_path):
    import shutil

    damaged = tmp_path / "truncated"
    shutil.copytree(snapshot, damaged)
    victim = damaged / "transformer" / "diffusion_pytorch_model.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    problems = verify_directory(damaged, full_hash=False).problems
    assert any("size" in p for p in problems)


def test_lora_location_is_an_operator_setting(tmp_path):
    def lora_file(**settings):
        return first_lora_file(lora_sources(Settings(weights_dir=tmp_path, **settings)))

    assert lora_file() is None
    with pytest.raises(WeightsMissing, match="PARTICALIZE_LORA_PATH"):
        lora_file(require_lora=True)
    with pytest.raises(WeightsMissing, match="particalize weights fetch"):
        lora_file(lora_repo="someone/particalize", lora_file="p.safetensors")
    fetched = tmp_path / "lora" / "someone--particalize" / "p.safetensors"
    fetched.parent.mkdir(parents=True)
    fetched.write_bytes(b"x")
    assert lora_file(lora_repo="someone/particalize", lora_file="p.safetensors") == fetched
    local = tmp_path / "mine.safetensors"
    local.write_bytes(b"x")
    assert lora_file(lora_path=local) == local


def test_cli_verify_reports_ok_for_a_snapshot(snapshot, capsys):
    from particalize.cli import main

    assert main(["weights", "verify", "--model", str(snapshot)]) == 0
    assert ": ok (" in capsys.readouterr().out
