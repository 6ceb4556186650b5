"""Per-request flow shift: a scheduler built from the loaded config, cached per shift value."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

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
        if self._cls is FlowMatchEulerDiscreteScheduler:
            return self._cls.from_config(self._config, shift=shift)
        if self._cls is UniPCMultistepScheduler or "flow_shift" in self._config:
            return self._cls.from_config(self._config, flow_shift=shift)
        raise TypeError(f"scheduler {self._cls.__name__} has no flow shift setting")

    def for_shift(self, shift: float) -> Any:
        return self._build(float(shift))
