"""Single weight files as an operator names them (local path, hf://, a huggingface.co URL), where a fetched one lives,
and the offline check of one file: size and sha256 from the manifest written at fetch time, readable header."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from weights.manifest import FileRecord, read_manifest, sha256_of, write_manifest
from weights.single_file import files_dir, parse_file_source, source_path, verify_file, verify_source


@pytest.mark.parametrize("text, repo, file, revision", [
    ("hf://city96/Wan2.1-I2V-14B-480P-gguf/wan2.1-i2v-14b-480p-Q4_K_S.gguf", "city96/Wan2.1-I2V-14B-480P-gguf",
     "wan2.1-i2v-14b-480p-Q4_K_S.gguf", None),
    ("hf://Comfy-Org/Wan_2.1_ComfyUI_repackaged@abc123/split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
     "Comfy-Org/Wan_2.1_ComfyUI_repackaged", "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
     "abc123"),
    ("https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/blob/main/split_files/diffusion_models/"
     "wan2.1_i2v_480p_14B_fp8_scaled.safetensors", "Comfy-Org/Wan_2.1_ComfyUI_repackaged",
     "split_files/diffusion_models/wan2.1_i2v_480p_14B_fp8_scaled.safetensors", "main"),
    ("https://huggingface.co/o/r/resolve/v1/w.gguf?download=true", "o/r", "w.gguf", "v1"),
])
def test_hub_sources_name_the_repo_file_and_revision(tmp_path, text, repo, file, revision):
    source = parse_file_source(text)
    assert (source.repo, source.file, source.revision, source.is_hub) == (repo, file, revision, True)
    assert source_path(source, tmp_path) == files_dir(tmp_path, repo) / file


def test_a_local_path_is_itself():
    source = parse_file_source(" /models/wan.safetensors ")
    assert source.path == Path("/models/wan.safetensors") and not source.is_hub


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("hf://owner/repo", "hf://owner/repo/path/to/file"),
    ("https://example.com/wan.safetensors", "only huggingface.co file URLs"),
])
def test_malformed_sources_say_what_to_write(text, message):
    with pytest.raises(ValueError, match=message):
        parse_file_source(text)


@pytest.fixture
def fetched(tmp_path: Path) -> Path:
    """A transformer file where `weights fetch` leaves one, with the manifest recording its size and sha256."""
    target = files_dir(tmp_path, "owner/repo") / "split_files"
    target.mkdir(parents=True)
    path = target / "wan.safetensors"
    save_file({"head.modulation": torch.zeros(1, 2, 4)}, str(path))
    write_manifest(files_dir(tmp_path, "owner/repo"), "owner/repo", "0" * 40,
                   [FileRecord("split_files/wan.safetensors", path.stat().st_size, sha256_of(path))])
    return path


def test_a_fetched_file_verifies(tmp_path, fetched):
    assert verify_source(parse_file_source("hf://owner/repo/split_files/wan.safetensors"), tmp_path) == []


def test_a_changed_byte_fails_the_hash_and_a_cut_file_the_size(tmp_path, fetched):
    source = parse_file_source("hf://owner/repo/split_files/wan.safetensors")
    data = bytearray(fetched.read_bytes())
    data[-1] ^= 1
    fetched.write_bytes(bytes(data))
    assert verify_source(source, tmp_path) == [f"{fetched}: sha256 differs from the hub's"]
    assert verify_source(source, tmp_path, full_hash=False) == []
    fetched.write_bytes(bytes(data[:-4]))
    assert verify_source(source, tmp_path) == [f"{fetched}: size {len(data) - 4}, expected {len(data)}"]


def test_a_local_file_without_a_manifest_is_checked_for_its_header(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"x": torch.zeros(2)}, str(good))
    assert verify_file(good) == []
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    assert "not a readable safetensors file" in verify_file(tmp_path / "bad.safetensors")[0]
    (tmp_path / "bad.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    assert verify_file(tmp_path / "bad.gguf") == [f"{tmp_path / 'bad.gguf'}: not a GGUF file (no GGUF magic)"]
    assert verify_file(tmp_path / "gone.gguf") == [f"{tmp_path / 'gone.gguf'}: missing"]


def test_fetch_adds_the_file_to_its_repos_manifest(tmp_path, monkeypatch):
    """Two files of one repo (a transformer and a text encoder) keep both records."""
    import huggingface_hub

    from weights.fetch import fetch_single_file

    def download(repo_id, filename, revision=None, local_dir=None, token=None):
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(filename.encode() * 10)
        return str(path)

    def model_info(self, repo_id, revision=None, files_metadata=False, token=None):
        siblings = [SimpleNamespace(rfilename=f, size=len(f) * 10, lfs=SimpleNamespace(sha256=f"sha-{f}"))
                    for f in ("a/wan.gguf", "b/umt5.safetensors")]
        return SimpleNamespace(sha="c" * 40, siblings=siblings)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    for file in ("a/wan.gguf", "b/umt5.safetensors"):
        path = fetch_single_file(parse_file_source(f"hf://o/r/{file}"), tmp_path)
        assert path == files_dir(tmp_path, "o/r") / file
    manifest = read_manifest(files_dir(tmp_path, "o/r"))
    assert manifest["files"] == {"a/wan.gguf": {"size": 100, "sha256": "sha-a/wan.gguf"},
                                 "b/umt5.safetensors": {"size": 180, "sha256": "sha-b/umt5.safetensors"}}
    with pytest.raises(ValueError, match="local file"):
        fetch_single_file(parse_file_source("/models/x.gguf"), tmp_path)
