"""Per-request flow shift: a scheduler built from the loaded config, cached per shift value."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler


def _frozen(config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, repr(v)) for k, v in config.items() if not k.startswith("_")))


class ShiftedSchedulers:
    """Schedulers are cheap and hold no weights, but rebuilding them per request is needless work."""

    def __init__(self, base: Any) -> None:
        self._cls = type(base)
        self._config = dict(base.config)
        self._build = lru_cache(maxsize=32)(self._make)

    def _make(self, shift: float) -> Any:
        if issubclass(self._cls, FlowMatchEulerDiscreteScheduler):
            return self._cls.from_config(self._config, shift=shift)
        if self._cls is UniPCMultistepScheduler or "flow_shift" in self._config:
            return self._cls.from_config(self._config, flow_shift=shift)
        raise TypeError(f"scheduler {self._cls.__name__} has no flow shift setting")

    def for_shift(self, shift: float) -> Any:
        return self._build(float(shift))


class StepDistillScheduler(FlowMatchEulerDiscreteScheduler):
    """Euler over the unshifted sigmas 1, (n-1)/n, ..., 1/n, each then shifted: for n = 4 exactly the timesteps
    1000, 750, 500, 250 (of 1000) of lightx2v's WanStepDistillScheduler, which their step-distilled Wan LoRAs
    were trained to sample with (see pipeline/fast.py). diffusers' own default spacing would miss them."""

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                      sigmas: list[float] | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None) -> None:
        if sigmas is None and timesteps is None and num_inference_steps:
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist()
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu,
                              timesteps=timesteps)


def step_distill_scheduler(shift: float) -> StepDistillScheduler:
    return StepDistillScheduler(num_train_timesteps=1000, shift=shift)
