"""Memory of each weight format for the real Wan2.1 I2V 14B transformer and UMT5-XXL text encoder, and which
configuration fits which GPU at 480P. Computed on the meta device from the real configs (exact parameter bytes,
by the rules the single-file loaders hold weights by: pipeline/weight_files/memory.py); nothing is allocated, no weights
are needed. Run:

    python -m benchmarks.bench_weight_formats [--out benchmarks/results/weight-formats.json]

The 480P peak adds CLIP + VAE (float32) and the activation headroom measured on an H200 (9.0 GiB: 51.0 GiB peak
minus 42.0 GiB of parameters, shared/notes/h200-measurements.md) to the weights on the GPU: an estimate that
assumes the headroom does not depend on the weight format (the layers dequantize one at a time).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from pipeline.weight_files.memory import (
    GIB,
    HEADROOM_480P_GIB,
    LABELS,
    SAFE_MARGIN_GIB,
    TEXT_ENCODER_FORMATS,
    USABLE_GIB,
    best_fit,
    clip_and_vae_bytes,
    configurations_480p,
    text_encoder_bytes,
    transformer_bytes_by_format,
)

RESULTS = Path(__file__).resolve().parent / "results" / "weight-formats.json"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    transformer = {k: v / GIB for k, v in transformer_bytes_by_format().items()}
    text_encoder = {k: text_encoder_bytes(k) / GIB for k in TEXT_ENCODER_FORMATS}
    rows = configurations_480p()
    picks = {card: best_fit(gib, rows) for card, gib in USABLE_GIB.items()}

    print("Transformer (Wan2.1 I2V 14B), GiB in memory with bf16 compute:")
    print(table(["format", "GiB"], [[LABELS[k], f"{v:.2f}"] for k, v in transformer.items()]))
    print("\nText encoder (UMT5-XXL), GiB on the GPU:")
    print(table(["format", "GiB"], [[LABELS.get(k, k), f"{v:.2f}"] for k, v in text_encoder.items()]))
    print(f"\nCLIP + VAE (float32): {clip_and_vae_bytes() / GIB:.2f} GiB; 480P headroom: {HEADROOM_480P_GIB:.1f} GiB")
    cards = list(USABLE_GIB)
    print("\n" + table(["transformer", "text encoder", "480P peak (est.)", *cards],
                       [[LABELS[r.transformer], LABELS.get(r.text_encoder, r.text_encoder), f"{r.peak_gib:.1f}",
                         *("✔" if r.fits(USABLE_GIB[c]) else "✘" for c in cards)] for r in rows]))
    for card, pick in picks.items():
        print(f"\n{card} (usable {USABLE_GIB[card]} GiB, {SAFE_MARGIN_GIB:.0f} GiB left free): "
              f"{pick.settings_hint() if pick else 'nothing fits'}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "weight memory per format on the meta device (exact parameter bytes); 480P peak = GPU weights + "
                "CLIP/VAE + measured H200 headroom (estimate)",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "transformer_gib": transformer, "text_encoder_gib": text_encoder,
        "clip_vae_gib": clip_and_vae_bytes() / GIB, "headroom_480p_gib": HEADROOM_480P_GIB,
        "usable_gib": USABLE_GIB, "safe_margin_gib": SAFE_MARGIN_GIB,
        "configurations": [r.as_dict() for r in rows],
        "best_fit": {card: (pick.as_dict() if pick else None) for card, pick in picks.items()},
    }, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
