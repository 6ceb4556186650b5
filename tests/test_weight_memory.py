"""Memory of each weight format for the real 14B I2V config, computed on the meta device, and the configuration
that fits a 24 GB card at 480P. (That the rules match what the loaders hold is checked on the tiny model in
test_transformer_file.py and test_text_encoder_file.py: measured bytes equal these functions' figures.)"""

from __future__ import annotations

import pytest
import torch
from transformers import UMT5Config

from pipeline.random_weights import UMT5_XXL, WAN_I2V_14B_TRANSFORMER
from pipeline.weight_files.memory import (
    GIB,
    HEADROOM_480P_GIB,
    TRANSFORMER_FORMATS,
    USABLE_GIB,
    Configuration,
    best_fit,
    configurations_480p,
)
from pipeline.weight_files.text_encoder_file import empty_text_encoder
from pipeline.weight_files.transformer_file import empty_transformer, keeps_float32


@pytest.fixture(scope="module")
def rows() -> list[Configuration]:
    return configurations_480p()


@pytest.fixture(scope="module")
def transformer_gib(rows) -> dict[str, float]:
    return {r.transformer: r.transformer_gib for r in rows}


def test_bf16_is_two_bytes_a_parameter_with_diffusers_float32_modules_at_four(transformer_gib):
    model = empty_transformer(WAN_I2V_14B_TRANSFORMER)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    fp32 = sum(p.numel() for n, p in params.items() if keeps_float32(n, model))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert 16.3e9 < total < 16.5e9 and 0 < fp32 < 0.01 * total
    assert transformer_gib["bf16"] * GIB == 2 * total + 2 * fp32 + buffers


def test_each_format_is_smaller_than_the_one_before_it(transformer_gib):
    assert transformer_gib["fp8"] == pytest.approx(transformer_gib["bf16"] / 2, rel=0.01)
    assert transformer_gib["fp8_scaled"] > transformer_gib["fp8"]  # a 4-byte scale per layer
    assert transformer_gib["gguf_Q8_0"] == pytest.approx(transformer_gib["fp8"] * 34 / 32, rel=0.01)
    gguf = [transformer_gib[f] for f in TRANSFORMER_FORMATS if f.startswith("gguf_")]
    assert gguf == sorted(gguf, reverse=True) and len(set(gguf)) == len(gguf)


def test_the_figures_in_results_md(transformer_gib):
    """benchmarks/RESULTS.md's memory table quotes these (GiB, bf16 compute)."""
    quoted = {"bf16": 30.59, "fp8": 15.36, "gguf_Q8_0": 16.31, "gguf_Q6_K": 12.62, "gguf_Q5_K": 10.59,
              "gguf_Q4_K": 8.69, "gguf_Q3_K": 6.67}
    assert {k: round(transformer_gib[k], 2) for k in quoted} == quoted


def test_the_text_encoder_counts_its_tied_embedding_once(rows):
    te = {r.text_encoder: r.text_encoder_gib for r in rows}
    model = empty_text_encoder(UMT5Config(**UMT5_XXL))
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert te["bf16"] * GIB == 2 * sum(p.numel() for p in model.parameters())
    assert round(te["bf16"], 2) == 10.58 and round(te["fp8_scaled"], 2) == 7.21 and te["cpu"] == 0


def test_a_24_gb_card_at_480p_takes_a_q4_k_gguf_transformer_with_the_text_encoder_on_the_cpu(rows):
    pick = best_fit(USABLE_GIB["24 GB"], rows)
    assert (pick.transformer, pick.text_encoder) == ("gguf_Q4_K", "cpu")
    assert pick.peak_gib == pytest.approx(pick.transformer_gib + pick.clip_vae_gib + HEADROOM_480P_GIB)
    assert pick.peak_gib < USABLE_GIB["24 GB"] - 2
    hint = pick.settings_hint()
    assert "PARTICALIZE_TRANSFORMER_FILE to a GGUF Q4_K transformer file" in hint
    assert "PARTICALIZE_TEXT_ENCODER_ON_CPU=1" in hint
    by = {(r.transformer, r.text_encoder): r for r in rows}
    assert not by["fp8_scaled", "cpu"].fits(USABLE_GIB["24 GB"])  # fp8 alone is not enough at 480P
    assert by["gguf_Q5_K", "cpu"].fits(USABLE_GIB["24 GB"])  # fits, with under 2 GiB to spare
    assert not by["bf16", "bf16"].fits(USABLE_GIB["48 GB"])


def test_unknown_formats_are_refused():
    from pipeline.weight_files.memory import text_encoder_bytes, transformer_bytes

    with pytest.raises(ValueError, match="unknown format 'int4'"):
        transformer_bytes("int4", compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown format 'gguf'"):
        text_encoder_bytes("gguf")
