"""Batched classifier-free guidance: the conditional and unconditional branches in one transformer forward.

diffusers' WanImageToVideoPipeline calls the transformer twice per step, cond then uncond, with the
same latent input. This diffusers ModelHook turns the first call into one batch-2 forward
(positive and negative prompt), returns the cond half, and answers the second call with the stored
uncond half. Exact up to batched-kernel rounding; costs the activation memory of a second sample.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK_NAME = "particalize_batched_cfg"


class BatchedGuidanceHook(ModelHook):
    _is_stateful = True

    def __init__(self) -> None:
        super().__init__()
        self.negative: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.batched_calls = 0

    def set_negative(self, embeds: torch.Tensor | None) -> None:
        """The negative prompt embeddings of the run about to start (None: no guidance, nothing to batch)."""
        self.negative = embeds
        self._pending = None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self._pending = None
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs.get("hidden_states")
        text = kwargs.get("encoder_hidden_states")
        forward = self.fn_ref.original_forward
        if args or hidden is None or text is None or self.negative is None or kwargs.get("return_dict", True):
            return forward(*args, **kwargs)
        if self._pending is not None:
            latent, uncond = self._pending
            self._pending = None
            if latent is hidden and torch.equal(text, self.negative.to(text.dtype)):
                return (uncond,)
        if text.shape != self.negative.shape:
            return forward(*args, **kwargs)

        batched = dict(kwargs)
        batched["hidden_states"] = torch.cat([hidden, hidden])
        batched["timestep"] = torch.cat([kwargs["timestep"]] * 2)
        batched["encoder_hidden_states"] = torch.cat([text, self.negative.to(text.dtype)])
        image = kwargs.get("encoder_hidden_states_image")
        if image is not None:
            batched["encoder_hidden_states_image"] = torch.cat([image, image])
        cond, uncond = forward(**batched)[0].chunk(2)
        self._pending = (hidden, uncond)
        self.batched_calls += 1
        return (cond,)


def enable_batched_guidance(transformer: torch.nn.Module) -> BatchedGuidanceHook:
    hook = BatchedGuidanceHook()
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK_NAME)
    return hook


def disable_batched_guidance(transformer: torch.nn.Module) -> None:
    """Remove the hook (if registered): the pipeline's two forwards a step again."""
    HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(HOOK_NAME, recurse=False)
