"""Which pipeline components come from single files instead of the preset (the transformer, the text encoder), and
the preset's configs those files are loaded with (from its diffusers directory, else the real configs in code)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import UMT5Config

from pipeline.errors import WeightFormatError


@dataclass(frozen=True)
class WeightFiles:
    """Local files replacing the preset's components; None keeps the preset's."""

    transformer: Path | None = None
    text_encoder: Path | None = None

    @property
    def any(self) -> bool:
        return self.transformer is not None or self.text_encoder is not None

    def components(self) -> tuple[str, ...]:
        """Pipeline component names these files replace."""
        return tuple(name for name, path in (("transformer", self.transformer), ("text_encoder", self.text_encoder))
                     if path is not None)


def directory_transformer_config(model_dir: Path | None) -> dict[str, Any]:
    """transformer/config.json of a diffusers directory when it has one, else Wan2.1 I2V 14B's (480P = 720P)."""
    if model_dir is not None and (model_dir / "transformer" / "config.json").is_file():
        return json.loads((model_dir / "transformer" / "config.json").read_text())
    from pipeline.random_weights import WAN_I2V_14B_TRANSFORMER

    return dict(WAN_I2V_14B_TRANSFORMER)


def directory_component_config(model_dir: Path | None, component: str) -> dict[str, Any] | None:
    """<component>/config.json of a diffusers directory when it has one; None: the real model's (in code)."""
    path = None if model_dir is None else model_dir / component / "config.json"
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def directory_text_encoder_config(model_dir: Path | None) -> UMT5Config:
    """text_encoder/config.json of a diffusers directory when it has one, else UMT5-XXL's encoder."""
    if model_dir is not None and (model_dir / "text_encoder" / "config.json").is_file():
        return UMT5Config.from_pretrained(model_dir / "text_encoder", local_files_only=True)
    from pipeline.random_weights import UMT5_XXL

    return UMT5Config(**UMT5_XXL)


def load_weight_files(files: WeightFiles, transformer_config: dict[str, Any], text_encoder_config: UMT5Config,
                      compute_dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The components the files replace, by pipeline component name."""
    loaded: dict[str, torch.nn.Module] = {}
    if files.transformer is not None:
        from pipeline.weight_files.transformer_file import load_transformer_file

        with _naming(files.transformer, "transformer"):
            loaded["transformer"] = load_transformer_file(Path(files.transformer), transformer_config, compute_dtype)
    if files.text_encoder is not None:
        from pipeline.weight_files.text_encoder_file import load_text_encoder_file

        with _naming(files.text_encoder, "text encoder"):
            loaded["text_encoder"] = load_text_encoder_file(Path(files.text_encoder), text_encoder_config,
                                                            compute_dtype)
    return loaded


@contextmanager
def _naming(path: Path, role: str) -> Iterator[None]:
    """A refusal that does not name its file says which file (and which role) it is about."""
    try:
        yield
    except WeightFormatError as exc:
        if Path(path).name in str(exc):
            raise
        raise WeightFormatError(f"{role} file {Path(path).name}: {exc}") from exc
