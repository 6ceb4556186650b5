"""FLOPs of one Wan2.1 I2V 14B denoising step, and the time floor that implies on a GPU.

Counted from the transformer's config (matmuls only, 2 FLOPs per multiply-add; norms, rotary
embeddings, modulation and the patch embed/head are below 0.1% and left out). Run:

    python -m benchmarks.flops [--height 480 --width 832 --num-frames 81] [--peak-tflops 989.4]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

# transformer/config.json of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (and -720P-)
WAN_I2V_14B = dict(num_layers=40, heads=40, head_dim=128, ffn_dim=13824)
TEXT_TOKENS = 512  # UMT5 sequence, padded to max_sequence_length
IMAGE_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 16 x 16 patches + class token
VAE_STRIDE = (4, 8, 8)
PATCH = (1, 2, 2)
H100_SXM_DENSE_BF16_TFLOPS = 989.4  # NVIDIA H100 SXM5 datasheet, dense (no sparsity)


@dataclass
class StepFlops:
    tokens: int
    self_attn_proj: float
    self_attn_core: float
    cross_attn: float
    ffn: float
    per_forward: float
    per_step_with_cfg: float


def video_tokens(height: int, width: int, num_frames: int) -> int:
    frames = (num_frames - 1) // VAE_STRIDE[0] + 1
    return frames * (height // VAE_STRIDE[1] // PATCH[1]) * (width // VAE_STRIDE[2] // PATCH[2])


def step_flops(height: int, width: int, num_frames: int, cfg: bool = True) -> StepFlops:
    c = WAN_I2V_14B
    d = c["heads"] * c["head_dim"]
    n = video_tokens(height, width, num_frames)
    ctx = TEXT_TOKENS + IMAGE_TOKENS
    self_proj = 4 * 2 * n * d * d  # q, k, v, o
    self_core = 2 * 2 * n * n * d  # QK^T and PV
    cross = 2 * 2 * n * d * d + 2 * 2 * ctx * d * d + 2 * 2 * n * ctx * d  # q,o; k,v (+ k_img,v_img); core
    ffn = 2 * 2 * n * d * c["ffn_dim"]
    forward = c["num_layers"] * (self_proj + self_core + cross + ffn)
    return StepFlops(n, self_proj, self_core, cross, ffn, forward, forward * (2 if cfg else 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_DENSE_BF16_TFLOPS)
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()

    f = step_flops(args.height, args.width, args.num_frames)
    floor_step = f.per_step_with_cfg / (args.peak_tflops * 1e12)
    rows = [
        ("video tokens", f"{f.tokens}"),
        ("self-attn projections / layer", f"{f.self_attn_proj / 1e12:.2f} TFLOP"),
        ("self-attn QK^T + PV / layer", f"{f.self_attn_core / 1e12:.2f} TFLOP"),
        ("cross-attn (text+image) / layer", f"{f.cross_attn / 1e12:.2f} TFLOP"),
        ("FFN / layer", f"{f.ffn / 1e12:.2f} TFLOP"),
        ("one transformer forward", f"{f.per_forward / 1e15:.3f} PFLOP"),
        ("one step (cond + uncond)", f"{f.per_step_with_cfg / 1e15:.3f} PFLOP"),
        (f"floor per step at {args.peak_tflops:g} TFLOP/s", f"{floor_step:.2f} s"),
        (f"floor for {args.steps} steps", f"{floor_step * args.steps:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"Wan2.1 I2V 14B, {args.height}x{args.width}, {args.num_frames} frames")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"inputs": vars(args), **asdict(f), "floor_step_seconds": floor_step}, fh, indent=2)


if __name__ == "__main__":
    main()
