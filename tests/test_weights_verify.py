"""A base-model snapshot is complete or clearly not: `verify` checks every component's config and weight files
from the snapshot's own layout, with or without a manifest; a local snapshot's pixel budget comes from its
metadata (the manifest's repo id, a hub cache's layout) or an explicit setting, never its directory name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from particalize.settings import Settings
from pipeline.errors import WeightsMissing
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.presets import PRESETS, get_preset
from pipeline.tiny import build_tiny_pipeline
from weights.manifest import MANIFEST_NAME, FileRecord, sha256_of, write_manifest
from weights.verify import verify_directory

AREA_480P, AREA_720P = PRESETS["wan2.1-i2v-14b-480p"].max_area, PRESETS["wan2.1-i2v-14b-720p"].max_area


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete diffusers snapshot (the tiny model saved as `save_pretrained` lays one out), no manifest."""
    target = tmp_path_factory.mktemp("weights") / "snapshot"
    build_tiny_pipeline().save_pretrained(target)
    return target


def copy_of(saved: Path, target: Path, manifest: bool, sharded: bool = False) -> Path:
    shutil.copytree(saved, target)
    if sharded:
        shard(target / "transformer")
    if manifest:
        files = [p for p in target.rglob("*") if p.is_file()]
        write_manifest(target, "local/tiny", "0" * 40,
                       [FileRecord(str(p.relative_to(target)), p.stat().st_size, sha256_of(p)) for p in files])
    return target


def shard(directory: Path) -> None:
    """Lay a component's weights out as shards listed in an index, as large checkpoints are."""
    single = directory / "diffusion_pytorch_model.safetensors"
    single.rename(directory / "diffusion_pytorch_model-00001-of-00002.safetensors")
    shutil.copy(directory / "diffusion_pytorch_model-00001-of-00002.safetensors",
                directory / "diffusion_pytorch_model-00002-of-00002.safetensors")
    weight_map = {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                  "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}
    (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("manifest", [False, True], ids=["no-manifest", "manifest"])
def test_a_complete_snapshot_verifies(saved: Path, tmp_path: Path, manifest: bool):
    snapshot = copy_of(saved, tmp_path / "s", manifest, sharded=True)
    report = verify_directory(snapshot)
    assert report.ok, report.problems


MISSING_CASES = {
    "vae-weights": "vae/diffusion_pytorch_model.safetensors",
    "vae-config": "vae/config.json",
    "transformer-config": "transformer/config.json",
    "text-encoder-weights": "text_encoder/model.safetensors",
    "image-encoder-config": "image_encoder/config.json",
    "tokenizer-vocabulary": "tokenizer/tokenizer.json",
    "tokenizer-config": "tokenizer/tokenizer_config.json",
    "scheduler-config": "scheduler/scheduler_config.json",
    "image-processor-config": "image_processor/preprocessor_config.json",
    "index-listed-shard": "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "a-whole-component": "text_encoder",
    "model-index": "model_index.json",
}


@pytest.mark.parametrize("manifest", [False, True], ids=["no-manifest", "manifest"])
@pytest.mark.parametrize("removed", list(MISSING_CASES.values()), ids=list(MISSING_CASES))
def test_verify_names_each_missing_file(saved: Path, tmp_path: Path, removed: str, manifest: bool):
    snapshot = copy_of(saved, tmp_path / "s", manifest, sharded=True)
    target = snapshot / removed
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    report = verify_directory(snapshot)
    assert not report.ok
    assert f"{target}: missing" in report.problems, report.problems


def test_loading_an_incomplete_snapshot_names_the_missing_file_before_any_weights_are_read(saved, tmp_path):
    snapshot = copy_of(saved, tmp_path / "s", manifest=False)
    (snapshot / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsMissing, match="vae/diffusion_pytorch_model.safetensors"):
        VideoGenerator(GeneratorOptions(get_preset(str(snapshot)), tmp_path))


def hub_cache_snapshot(saved: Path, cache: Path, repo_id: str) -> Path:
    """The snapshot where huggingface_hub's cache keeps it: <cache>/models--<owner>--<name>/snapshots/<commit>."""
    target = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("a1" * 20)
    shutil.copytree(saved, target)
    return target


def test_a_720p_snapshot_in_a_hub_cache_gets_the_720p_budget(saved: Path, tmp_path: Path):
    snapshot = hub_cache_snapshot(saved, tmp_path / "hub", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers")
    assert get_preset(str(snapshot)).max_area == AREA_720P
    other = hub_cache_snapshot(saved, tmp_path / "hub", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers")
    assert get_preset(str(other)).max_area == AREA_480P


def test_the_manifest_repo_id_sets_the_budget_and_a_directory_name_does_not(saved: Path, tmp_path: Path):
    named_720 = copy_of(saved, tmp_path / "wan-720p-weights", manifest=False)
    assert get_preset(str(named_720)).max_area == AREA_480P, "the directory's name says nothing"
    fetched = copy_of(saved, tmp_path / "weights-a", manifest=False)
    write_manifest(fetched, "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", "b" * 40, [])
    assert (fetched / MANIFEST_NAME).is_file() and get_preset(str(fetched)).max_area == AREA_720P


def test_an_explicit_setting_sets_the_budget(saved: Path, tmp_path: Path, monkeypatch):
    snapshot = hub_cache_snapshot(saved, tmp_path / "hub", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers")
    assert get_preset(str(snapshot), max_area=AREA_720P).max_area == AREA_720P
    monkeypatch.setenv("PARTICALIZE_MODEL_MAX_AREA", str(AREA_720P))
    assert Settings().model_max_area == AREA_720P
