"""A catalogue whose LoRA does not fit the base stops `serve` at start in one line naming the tool and the fix,
checked from each file's safetensors header against the base's config (nothing loaded); `weights verify` checks
every tool's LoRAs the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from particalize.cli import main
from particalize.tools import CatalogueError, check_fit, read_tools_file
from pipeline.lora.fit import base_parts, misfit
from pipeline.lora.keys import ModelParts, plan_lora
from pipeline.lora.stack import read_lora_file
from pipeline.tiny import TINY_TRANSFORMER_CONFIG
from tests.conftest import make_settings
from tests.lora_files import make_diffs, make_weights, write_lora


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRAs for the tiny base in two published layouts (one with full differences), one of another model's shapes
    (a wider FFN), one whose keys name nothing in a Wan transformer (an SD-UNet LoRA), and one half-fitting."""
    tmp = tmp_path_factory.mktemp("fit")
    tiny = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    wider = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "ffn_dim": 48})
    unet = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    save_file(unet, str(tmp / "unet.safetensors"))
    fitting = {k: v.contiguous() for k, v in read_lora_file(
        write_lora(tmp / "half.safetensors", make_weights(tiny, seed=4), "diffusers")).items()}
    save_file({**fitting, **unet}, str(tmp / "half.safetensors"))
    return {
        "squish": write_lora(tmp / "squish.safetensors", make_weights(tiny, seed=1), "kohya"),
        "inflate": write_lora(tmp / "inflate.safetensors", make_weights(tiny, rank=2, seed=2),
                              "original_down_up_alpha", make_diffs(tiny)),
        "wider": write_lora(tmp / "wider.safetensors", make_weights(wider, seed=3), "kohya"),
        "unet": tmp / "unet.safetensors",
        "half": tmp / "half.safetensors",
    }


def catalogue(folder: Path, squish: Path, inflate: Path) -> Path:
    path = folder / "tools.toml"
    path.write_text(f'[[tools]]\nslug = "remade/Squish"\nloras = ["{squish}:0.9"]\n'
                    f'[[tools]]\nslug = "remade/Inflate"\nloras = ["{squish}", "{inflate}"]\n', encoding="utf-8")
    return path


def test_the_header_plan_is_the_loaders_plan(loras: dict[str, Path]):
    """Planned from the header alone, every file lands where loading puts it, and the same keys fit nothing."""
    parts = ModelParts.of(WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG))
    meta_parts = base_parts(TINY_TRANSFORMER_CONFIG)
    assert meta_parts.shapes == parts.shapes and meta_parts.linears == parts.linears
    from pipeline.lora.fit import plan_file

    for path in loras.values():
        loaded, header = plan_lora(read_lora_file(path), parts), plan_file(path, meta_parts)
        assert header.pairs.keys() == loaded.pairs.keys() and header.deltas.keys() == loaded.deltas.keys()
        assert header.problems == loaded.problems
        assert {m: p.scale for m, p in header.pairs.items()} == {m: p.scale for m, p in loaded.pairs.items()}


def test_fitting_loras_pass_and_misfits_are_named(loras: dict[str, Path]):
    parts = base_parts(TINY_TRANSFORMER_CONFIG)
    assert misfit(loras["squish"], parts) is None and misfit(loras["inflate"], parts) is None
    wider = misfit(loras["wider"], parts)
    assert wider is not None and "keys of wider.safetensors fit nothing in this base" in wider
    assert ("lora_unet_blocks_0_ffn_0.alpha and 2 more keys: shapes (4, 24) / (48, 4) do not fit "
            "blocks.0.ffn.net.0.proj (in_features 24, out_features 32)") in wider
    unet = misfit(loras["unet"], parts)
    assert unet is not None and unet.startswith("no key of unet.safetensors fits this base (")
    assert "this model has no layer 'down_blocks_0_attentions_0_proj_in'" in unet
    half = misfit(loras["half"], parts)
    assert half is not None and half.startswith("3 of ")
    assert misfit(loras["half"], parts, strict=False) is None  # PARTICALIZE_LORA_STRICT=false loads what fits
    assert misfit(loras["unet"], parts, strict=False) is not None  # nothing fits: refused either way


@pytest.mark.parametrize("bad", ["wider", "unet"])
def test_a_catalogue_lora_that_does_not_fit_is_refused_naming_the_tool(tmp_path: Path, loras: dict[str, Path],
                                                                       bad: str):
    settings = make_settings(tmp_path)
    good = catalogue(tmp_path, loras["squish"], loras["inflate"])
    check_fit(read_tools_file(good, settings), settings)
    path = catalogue(tmp_path, loras["squish"], loras[bad])
    with pytest.raises(CatalogueError) as refused:
        check_fit(read_tools_file(path, settings), settings)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: tool 'remade/Inflate': loras[1] {loras[bad]} does not fit tiny: ")
    assert message.endswith("Use a LoRA made for Wan2.1 I2V 14B, or remove it from the tool")


def test_serve_stops_at_start_on_a_lora_that_does_not_fit(tmp_path: Path, loras: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PARTICALIZE_DATA_DIR", str(tmp_path / "data"))
    path = catalogue(tmp_path, loras["squish"], loras["wider"])
    assert main(["serve", "--model", "tiny", "--workers", "0", "--tools", str(path)]) == 2
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {path}: tool 'remade/Inflate': loras[1] {loras['wider']} does not fit "
                                "tiny: ")


def test_weights_verify_checks_every_tools_loras(tmp_path: Path, loras: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]):
    good = catalogue(tmp_path, loras["squish"], loras["inflate"])
    assert main(["weights", "verify", "--model", "tiny", "--tools", str(good)]) == 0
    printed = capsys.readouterr().out
    assert f"tool remade/Inflate: {loras['inflate']}: ok" in printed
    assert f"tool remade/Squish: {loras['squish']}: ok" in printed
    bad = catalogue(tmp_path, loras["squish"], loras["unet"])
    assert main(["weights", "verify", "--model", "tiny", "--tools", str(bad)]) == 1
    printed = capsys.readouterr().out
    assert f"tool remade/Inflate: {loras['unet']}: FAILED" in printed
    assert "no key of unet.safetensors fits this base" in printed
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(loras["squish"].read_bytes()[:100])
    truncated = catalogue(tmp_path, broken, loras["inflate"])
    assert main(["weights", "verify", "--model", "tiny", "--tools", str(truncated)]) == 1
    assert f"tool remade/Squish: {broken}: FAILED" in capsys.readouterr().out
