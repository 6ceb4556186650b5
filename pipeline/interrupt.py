"""Interruption points inside a run: before every transformer block, and every VAE encoder and decoder call.

A kill must stop the GPU within one transformer block, not one denoising step (on the real 14B model at 480P a
step is ~6.6 s, a block ~0.17 s), a run killed during its last step must not start the VAE decode, and one
killed while the conditioning frames are VAE-encoded (before the first step) stops there.

The transformer's forward walks `transformer.blocks` in Python (only the blocks themselves may be compiled), so
the check sits in that walk: the block list's class is swapped for one whose iteration asks the run's check first.
That keeps the check outside compiled regions (a forward pre-hook on a block runs inside `torch.compile`'s graph
when the block is compiled with fullgraph=True, where Python-side flags cannot be read), and leaves the modules,
their parameters and state-dict keys as they are. The VAE is never compiled: forward pre-hooks on its encoder
and decoder (called chunk by chunk of frames) do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

StopCheck = Callable[[], bool]


class BlockInterrupt(Exception):
    """Raised at an interruption point when the run's check says stop; the generator turns it into Interrupted."""


class _CheckedBlocks(nn.ModuleList):
    """`nn.ModuleList` whose iteration asks the run's check before yielding each block."""

    interrupt_points: InterruptPoints

    def __iter__(self) -> Iterator[nn.Module]:
        for block in super().__iter__():
            self.interrupt_points.check()
            yield block


class InterruptPoints:
    """Installed once on a warm pipeline; `check` is set per run (None between runs: no cost, no effect)."""

    def __init__(self, pipe: Any) -> None:
        self.stop: StopCheck | None = None
        self.blocks_entered = 0
        """Transformer blocks started in this run (for tests and logs)."""
        self.problems: list[str] = []
        """What could not be installed (empty: every point is in place); logged loudly at start and in /ready."""
        blocks = getattr(pipe.transformer, "blocks", None)
        self.blocks_hooked = isinstance(blocks, nn.ModuleList)
        """The per-block check is in place; False: a kill is seen at the end of the step (per-step interrupt)."""
        if isinstance(blocks, nn.ModuleList) and not isinstance(blocks, _CheckedBlocks):
            blocks.__class__ = _CheckedBlocks
            blocks.interrupt_points = self
        elif not self.blocks_hooked:
            found = "missing" if blocks is None else f"a {type(blocks).__name__}, not an nn.ModuleList"
            self.problems.append(f"the per-block interrupt could not be installed (transformer.blocks is {found}): "
                                 "Kill stops a run at the end of its current step (per-step interrupt)")
        vae = getattr(pipe, "vae", None)
        missing = [name for name in ("encoder", "decoder") if not isinstance(getattr(vae, name, None), nn.Module)]
        for name in ("encoder", "decoder"):
            if name not in missing:
                getattr(vae, name).register_forward_pre_hook(lambda module, args: self._check_vae())
        self.vae_hooked = not missing
        """The VAE encoder and decoder checks are in place."""
        if missing:
            self.problems.append(f"the VAE interrupt could not be installed (vae.{' and vae.'.join(missing)} "
                                 "missing): a kill during the VAE encode or decode waits for it to finish")

    def arm(self, stop: StopCheck | None) -> None:
        """Set the check of the run that starts now (None: the run has ended)."""
        self.stop = stop
        if stop is not None:
            self.blocks_entered = 0

    def check(self) -> None:
        if self.stop is not None and self.stop():
            raise BlockInterrupt()
        self.blocks_entered += 1

    def _check_vae(self) -> None:
        if self.stop is not None and self.stop():
            raise BlockInterrupt()
