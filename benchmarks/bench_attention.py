"""Attention alone at Wan2.1's self-attention shape: each kernel's time, TFLOP/s and |kernel - SDPA|.

    python -m benchmarks.bench_attention            # batch 1, 40 heads, 32,760 tokens (480P, 81 frames), dim 128, bf16
    python -m benchmarks.bench_attention --small    # 4 heads, 1,024 tokens, dim 64: a CPU check that it runs
    python -m benchmarks.bench_attention --tokens 75600   # 720P

Every kernel is called through diffusers' attention dispatch (q, k, v as (batch, tokens, heads, dim)), the
path the transformer takes, so a backend measured here is one the server can use. FlashAttention-4 is the local
`flash-attn-4` wheel (pipeline.speed.fa4). Kernels that are not installed or not supported here are listed as skipped
with the reason. Writes benchmarks/results/attention-<cuda|cpu>[-small].json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import timed
from pipeline.speed import fa4

# (name shown, diffusers backend); "native" is PyTorch SDPA's own pick (cuDNN attention on Hopper).
KERNELS = (
    ("sdpa", "native"),
    ("sdpa-cudnn", "_native_cudnn"),
    ("sdpa-flash2", "_native_flash"),
    ("sdpa-efficient", "_native_efficient"),
    ("sdpa-math", "_native_math"),
    ("fa4", fa4.NAME),
    ("fa3", "_flash_3"),
    ("flash-attn2", "flash"),
    ("sage (int8, approximate)", "sage"),
)
MATH_MAX_TOKENS = 8192
"""The math kernel materializes the (tokens x tokens) score matrix per head: skipped above this."""


def attention_flops(batch: int, heads: int, tokens: int, dim: int) -> float:
    """QK^T and PV: 2 matmuls of 2 * tokens^2 * dim FLOPs per head."""
    return 4.0 * batch * heads * tokens * tokens * dim


def _runner(backend: str, device: torch.device) -> tuple[Any, str | None]:
    """A function (q, k, v) -> out through diffusers' dispatch, or the reason this backend cannot run here."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    if backend == fa4.NAME:
        reason = fa4.unsupported_reason(device, torch.bfloat16)
        if reason:
            return None, reason
        from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY

        _HUB_KERNELS_REGISTRY[AttentionBackendName.FLASH_4_HUB].kernel_fn = fa4.compilable_kernel
        name = AttentionBackendName.FLASH_4_HUB
    else:
        name = AttentionBackendName(backend)
        if device.type != "cuda" and backend not in ("native", "_native_math"):
            return None, f"needs CUDA (running on {device.type})"
        try:
            _check_attention_backend_requirements(name)
        except (RuntimeError, ImportError) as exc:
            return None, str(exc).split(". ")[0]
    return (lambda q, k, v: dispatch_attention_fn(q, k, v, backend=name)), None


def measure(batch: int, heads: int, tokens: int, dim: int, dtype: torch.dtype, device: torch.device,
            repeats: int, kernels: tuple[tuple[str, str], ...] = KERNELS) -> list[dict[str, Any]]:
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn((batch, tokens, heads, dim), device=device, dtype=dtype, generator=generator)
               for _ in range(3))
    flops = attention_flops(batch, heads, tokens, dim)
    rows: list[dict[str, Any]] = []
    reference = None
    for shown, backend in kernels:
        row: dict[str, Any] = {"kernel": shown, "backend": backend}
        if backend == "_native_math" and tokens > MATH_MAX_TOKENS:
            rows.append(row | {"skipped": f"materializes {tokens}^2 scores per head"})
            continue
        run, reason = _runner(backend, device)
        if run is None:
            rows.append(row | {"skipped": reason})
            continue
        try:
            with torch.no_grad():
                seconds, out = timed(lambda run=run: run(q, k, v), device, repeats=repeats, warmup=2)
        except Exception as exc:  # one kernel failing (shape, dtype, GPU) must not hide the others
            rows.append(row | {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        out = out[0] if isinstance(out, tuple) else out
        if reference is None:
            reference = out.float()
        row |= {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
                "max_abs_diff_vs_sdpa": float((out.float() - reference).abs().max())}
        rows.append(row)
        del out
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'kernel':<26}{'ms/call':>10}{'TFLOP/s':>10}{'max|d| vs SDPA':>16}  note")
    for r in rows:
        if "ms" in r:
            print(f"{r['kernel']:<26}{r['ms']:>10.2f}{r['tflops']:>10.1f}{r['max_abs_diff_vs_sdpa']:>16.1e}")
        else:
            print(f"{r['kernel']:<26}{'-':>10}{'-':>10}{'-':>16}  {r.get('skipped') or r.get('error')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a CPU-sized shape: 4 heads, 1,024 tokens, dim 64")
    p.add_argument("--tokens", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    heads, tokens, dim = (4, 1024, 64) if args.small else (40, 32760, 128)
    heads, tokens, dim = args.heads or heads, args.tokens or tokens, args.dim or dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = measure(1, heads, tokens, dim, dtype, device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    print(f"attention, batch 1, {heads} heads, {tokens} tokens, dim {dim}, {dtype}, on {name}, "
          f"torch {torch.__version__}")
    print_table(rows)
    out = args.out or Path(f"benchmarks/results/attention-{device.type}{'-small' if args.small else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": dt.datetime.now(dt.timezone.utc).isoformat(), "device": name,
                               "torch": torch.__version__, "shape": [1, tokens, heads, dim], "dtype": str(dtype),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
