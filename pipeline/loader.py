"""Load the base Wan2.1 I2V pipeline from disk (or build the tiny one), with the dtypes Wan's reference uses."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
from transformers import CLIPVisionModel

from pipeline.devices import serving_dtype_for
from pipeline.errors import WeightFormatError, WeightsMissing
from pipeline.presets import ModelPreset
from pipeline.weight_files.files import (
    WeightFiles,
    directory_text_encoder_config,
    directory_transformer_config,
    load_weight_files,
)

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def preset_dir(preset: ModelPreset, weights_dir: Path) -> Path:
    """Where a preset's diffusers snapshot lives on disk."""
    return preset.local_dir or (weights_dir / preset.name)


def transformer_config(preset: ModelPreset, weights_dir: Path) -> dict[str, Any]:
    """The config the preset's transformer is built from: the tiny model's, else its directory's (the real Wan2.1
    I2V 14B config when the directory is not on disk yet): what a LoRA's shapes are checked against."""
    if preset.is_tiny:
        from pipeline.tiny import TINY_TRANSFORMER_CONFIG

        return dict(TINY_TRANSFORMER_CONFIG)
    return directory_transformer_config(preset_dir(preset, weights_dir))


def missing_files(model_dir: Path) -> list[Path]:
    """Files a complete diffusers snapshot must have that are not there, read from the snapshot's own layout:
    model_index.json names the components; each needs its config (config.json, scheduler_config.json,
    preprocessor_config.json, or a tokenizer's config and vocabulary) and a model its weights (every shard its
    *.index.json lists, else its single weights file)."""
    index = model_dir / "model_index.json"
    if not index.is_file():
        return [index]
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError):
        return [index]
    missing: list[Path] = []
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        sub = model_dir / name
        if not sub.is_dir():
            missing.append(sub)
            continue
        missing.extend(_component_missing(sub, name, str(spec[0]), str(spec[1])))
    return missing


TOKENIZER_VOCABULARIES = ("tokenizer.json", "spiece.model", "tokenizer.model", "vocab.json", "vocab.txt")
SINGLE_WEIGHTS = {
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "transformers": ("model.safetensors", "pytorch_model.bin"),
}


def _component_missing(sub: Path, name: str, library: str, class_name: str) -> list[Path]:
    if class_name.endswith("Scheduler") or name.startswith("scheduler"):
        return [] if (sub / "scheduler_config.json").is_file() else [sub / "scheduler_config.json"]
    if "Processor" in class_name or "FeatureExtractor" in class_name:
        return [] if (sub / "preprocessor_config.json").is_file() else [sub / "preprocessor_config.json"]
    if "Tokenizer" in class_name or name.startswith("tokenizer"):
        found = [sub / f for f in ("tokenizer_config.json",) if not (sub / f).is_file()]
        if not any((sub / f).is_file() for f in TOKENIZER_VOCABULARIES):
            found.append(sub / TOKENIZER_VOCABULARIES[0])
        return found
    missing = [] if (sub / "config.json").is_file() else [sub / "config.json"]
    shard_indexes = sorted(sub.glob("*.index.json"))
    for shard_index in shard_indexes:
        try:
            shards = set(json.loads(shard_index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            missing.append(shard_index)
            continue
        missing.extend(sub / s for s in sorted(shards) if not (sub / s).is_file())
    if not shard_indexes:
        singles = SINGLE_WEIGHTS.get(library, SINGLE_WEIGHTS["diffusers"] + SINGLE_WEIGHTS["transformers"])
        if not any((sub / f).is_file() for f in singles):
            missing.append(sub / singles[0])
    return missing


def fetch_hint(preset: ModelPreset) -> str:
    if preset.local_dir is not None:
        return f"copy a complete diffusers snapshot into {preset.local_dir}"
    return f"run `particalize weights fetch --model {preset.name}`"


def load_base_pipeline(
    preset: ModelPreset, weights_dir: Path, device: torch.device, place: bool = True, random_weights: bool = False,
    weight_files: WeightFiles | None = None,
) -> WanImageToVideoPipeline:
    """Transformer and text encoder in bf16 on CUDA; VAE and CLIP image encoder in float32 (as Wan's reference).

    `place=False` leaves the weights on the CPU for an offload mode to place them. `random_weights` builds the
    real-size model in code instead of reading it (pipeline.random_weights: its videos are noise). `weight_files`:
    single files replacing the preset's transformer and/or text encoder (pipeline.weight_files.files); the preset's
    directory then needs no weights for those components, and the tiny preset keeps its float32 compute.
    """
    files = weight_files or WeightFiles()
    if random_weights and not preset.is_tiny:
        if files.any:
            raise WeightFormatError("random weights build every component in code: a transformer or text encoder "
                                    "file cannot be used with them")
        from pipeline.random_weights import NOISE_WARNING, build_random_pipeline

        log.warning("%s: building %s on %s", NOISE_WARNING, preset.name, device if place else "cpu")
        return build_random_pipeline(device if place else torch.device("cpu"), dtype=serving_dtype_for(device))
    if preset.is_tiny:
        from pipeline.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_components

        components = build_tiny_components()
        components.update(load_weight_files(files, dict(TINY_TRANSFORMER_CONFIG),
                                            components["text_encoder"].config, torch.float32))
        pipe = WanImageToVideoPipeline(**components)
        return pipe.to(device) if place else pipe

    model_dir = preset_dir(preset, weights_dir)
    replaced = [model_dir / name for name in files.components()]
    missing = [p for p in missing_files(model_dir) if not any(p == r or r in p.parents for r in replaced)]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise WeightsMissing(f"model {preset.name} is not complete on disk (missing {shown}): {fetch_hint(preset)}")

    dtype = serving_dtype_for(device)
    log.info("loading %s from %s (%s on %s)", preset.name, model_dir, dtype, device)
    from_files = load_weight_files(files, directory_transformer_config(model_dir),
                                   directory_text_encoder_config(model_dir), dtype)
    image_encoder = CLIPVisionModel.from_pretrained(
        model_dir, subfolder="image_encoder", torch_dtype=torch.float32, local_files_only=True
    )
    vae = AutoencoderKLWan.from_pretrained(
        model_dir, subfolder="vae", torch_dtype=torch.float32, local_files_only=True
    )
    pipe = WanImageToVideoPipeline.from_pretrained(
        model_dir, vae=vae, image_encoder=image_encoder, torch_dtype=dtype, local_files_only=True, **from_files
    )
    return pipe.to(device) if place else pipe
