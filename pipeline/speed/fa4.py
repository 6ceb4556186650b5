"""FlashAttention-4 (PyPI `flash-attn-4`, extra `[fa4]`) through diffusers' attention dispatch.

diffusers registers FA4 only as a Hub kernel (`flash_4_hub`: its dispatch function calls the kernel that
`kernels` downloads). We put the locally installed kernel in that registry slot instead, so diffusers'
own registered `flash_4_hub` function runs it: no download. The kernel goes in wrapped as a torch custom op,
because FA4's `flash_attn_func` JIT-compiles CuTe DSL code that torch.compile cannot trace (a graph break,
an error with fullgraph=True); an opaque op compiles around it. diffusers' `set_attention_backend` would
insist on the `kernels` package (which only the Hub path needs), so the backend is set on the attention
processors directly, as that method does.

FA4 runs bf16/fp16 on Hopper (SM90) and Blackwell (SM100); its float8 path needs SM100. Before it is used,
its output is checked against PyTorch SDPA on random inputs (`max_abs_error`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

NAME = "flash_4"
"""Our name for it in `attention_backend` (diffusers' own `flash_4_hub` stays the Hub-download path)."""
SUPPORTED_MAJORS = (9, 10, 11)
"""Compute capability majors FA4's forward accepts: Hopper (9.x) and Blackwell (10.x, 11.x)."""
MAX_ABS_ERROR = 2e-2
"""Largest |FA4 - SDPA| accepted on the random check (bf16 rounding is ~1e-3; a wrong kernel is ~1)."""


def local_kernel() -> Callable:
    """The installed FA4 `flash_attn_func` (q, k, v in (batch, seq, heads, dim)); ImportError when absent."""
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why FA4 cannot run here, or None."""
    try:
        local_kernel()
    except ImportError as exc:
        return f"flash-attn-4 is not installed (pip install 'particalize[fa4]'): {exc}"
    except Exception as exc:  # a broken install (missing CUTLASS DSL libraries, ...) must not stop the server
        return f"flash-attn-4 does not import ({type(exc).__name__}: {exc})"
    if device.type != "cuda":
        return f"FlashAttention-4 needs a CUDA GPU, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_MAJORS:
        return f"FlashAttention-4 supports Hopper and Blackwell (SM90/SM100), not SM{major}{minor}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"FlashAttention-4 runs bf16/fp16, not {dtype}"
    return None


def _output(result: object) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result  # FA4 returns (out, lse)


@torch.library.custom_op("particalize::fa4_attention", mutates_args=())
def _fa4_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None, causal: bool
            ) -> torch.Tensor:
    return _output(local_kernel()(q, k, v, softmax_scale=softmax_scale, causal=causal))


@_fa4_op.register_fake
def _fa4_op_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None, causal: bool
                  ) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def compilable_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None, causal: bool = False
) -> torch.Tensor:
    """FA4 as diffusers' `flash_4_hub` entry calls it (keywords q, k, v, softmax_scale, causal), compilable."""
    return torch.ops.particalize.fa4_attention(q, k, v, softmax_scale, causal)


def max_abs_error(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int] = (1, 1024, 8, 128), seed: int = 0
) -> float:
    """max |FA4 - SDPA| on random q, k, v of `shape` (batch, seq, heads, head_dim)."""
    local_kernel()
    generator = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(3))
    with torch.no_grad():
        ours = compilable_kernel(q, k, v)
        reference = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
    return float((ours.float() - reference.float()).abs().max())


def enable(transformer: torch.nn.Module) -> None:
    """Route every attention call of `transformer` to the local FA4 kernel via diffusers' `flash_4_hub` entry."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName

    backend = AttentionBackendName.FLASH_4_HUB
    local_kernel()  # ImportError here, not in the first forward
    entry = _HUB_KERNELS_REGISTRY[backend]
    previous = entry.kernel_fn
    entry.kernel_fn = compilable_kernel
    try:
        for module in transformer.modules():
            processor = getattr(module, "processor", None)
            if isinstance(module, AttentionModuleMixin) and hasattr(processor, "_attention_backend"):
                processor._attention_backend = backend
    except BaseException:
        entry.kernel_fn = previous  # the caller resets the processors (acceleration.choose_attention)
        raise


def try_enable(transformer: torch.nn.Module, device: torch.device) -> tuple[str | None, float | None]:
    """Enable FA4 when it is installed, supported and exact here: (None, error) or (why not, error or None).

    An error from `enable` itself (diffusers renaming the registry or the names it relies on) propagates: the
    caller resets every processor to SDPA and lists it as a fallback (acceleration.choose_attention)."""
    dtype = next(transformer.parameters()).dtype
    reason = unsupported_reason(device, dtype)
    if reason is not None:
        return reason, None
    try:
        error = max_abs_error(device, dtype)
    except Exception as exc:  # its JIT compile or launch failing here means it would fail in the first task
        return f"FlashAttention-4 failed its check against SDPA ({type(exc).__name__}: {str(exc)[:200]})", None
    if not error <= MAX_ABS_ERROR:
        return f"FlashAttention-4 differs from SDPA by {error:.2e} (> {MAX_ABS_ERROR:g}) on random inputs", error
    enable(transformer)
    return None, error
