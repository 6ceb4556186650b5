"""MagCache: calibrated step skipping through diffusers' MagCache hooks, one warm model serving exact and cached runs.

Why calibrated: MagCache skips a denoising step's transformer blocks (reusing the last computed residual) when a
per-model curve says the output residual barely changes there: the ratio of the residual's magnitudes from one step to
the next, measured once on the real model. The run's own activations play no part in the decision, so the steps
computed follow from the ratios, the step count and three settings (threshold, K = most steps skipped in a row,
retention = the first fraction of steps always computed) alone: the same on random and on real weights.

diffusers' hooks (`MagCacheConfig`, `apply_mag_cache`) do the caching; this module keeps their arithmetic and adds
what a server needs around them:
- one ratio list per classifier-free-guidance pass, as LightX2V publishes Wan's: the head hook is diffusers' own,
  subclassed to take the config of the pass the pipeline's `cache_context` names ("cond" / "uncond");
- any step count per request: `MagCacheConfig` interpolates its ratios when built, so one is built per step count;
- exact runs from the same warm model: their config lets no step be skipped (K = 0);
- compile: the hooks are `torch.compiler.disable`d, so a compiled block *around* them would run eager; the block's
  own forward *under* them is compiled instead (`compile`), one graph for every block;
- which steps each pass computed, for the task's record, and diffusers' calibration captured into a file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.hooks import HookRegistry, MagCacheConfig
from diffusers.hooks.mag_cache import (
    _MAG_CACHE_BLOCK_HOOK,
    _MAG_CACHE_LEADER_BLOCK_HOOK,
    MagCacheBlockHook,
    MagCacheHeadHook,
)

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

PASSES = ("cond", "uncond")
"""The cache contexts diffusers' WanImageToVideoPipeline names its two guidance passes (uncond only with CFG)."""
CALIBRATION_DIR = Path(__file__).parent / "calibrations"
"""Calibrations shipped with the code, one file per preset: `<preset>.magcache.json`."""
CALIBRATION_NAME = "magcache-calibration.json"
"""A calibration made by `particalize calibrate`, next to the preset's weights (it wins over a shipped one)."""
FORMAT = 1
RunKind = Literal["exact", "cached", "calibrate"]


class MagCacheUnavailable(PipelineError, ValueError):
    """The MagCache step cache cannot run as configured (no calibration for this model, context parallelism); the
    message says why and what to do instead. Raised at start, before any weights are read."""


@dataclass(frozen=True)
class MagSettings:
    """The decision rule's settings; defaults are the ones LightX2V publishes with its Wan2.1 I2V 480P calibration."""

    threshold: float = 0.24
    max_skip_steps: int = 6
    retention_ratio: float = 0.2
    calibration: Path | None = None
    """A calibration file to use instead of the preset's (None: next to the weights, else the shipped one)."""


@dataclass(frozen=True)
class MagCalibration:
    """Per-pass ratios of one model, with where they came from and the run they were measured on."""

    ratios: Mapping[str, tuple[float, ...]]
    source: str
    model: str = ""
    calibrated_with: Mapping[str, Any] = field(default_factory=dict)
    published_settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.ratios["cond"])

    @property
    def short_source(self) -> str:
        """The source's first phrase, for one-line notes (the start-up banner, /ready)."""
        return self.source.split(": ")[0].split(" (")[0]

    def for_pass(self, name: str) -> tuple[float, ...]:
        """The pass's own list; the conditional one for a pass calibrated without guidance (or an unknown name)."""
        return self.ratios.get(name) or self.ratios["cond"]

    @classmethod
    def load(cls, path: Path) -> MagCalibration:
        try:
            body = json.loads(path.read_text())
            ratios = {name: tuple(float(r) for r in values) for name, values in body["ratios"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MagCacheUnavailable(f"{path} is not a MagCache calibration file ({type(exc).__name__}: {exc}); "
                                      "make one with `particalize calibrate`") from None
        lengths = {len(values) for values in ratios.values()}
        if "cond" not in ratios or len(lengths) != 1 or 0 in lengths:
            raise MagCacheUnavailable(f"{path}: a MagCache calibration needs a non-empty 'cond' ratio list (and an "
                                      f"'uncond' one of the same length, with guidance); got {sorted(ratios)} of "
                                      f"lengths {sorted(lengths)}")
        return cls(ratios=ratios, source=str(body.get("source", path)), model=str(body.get("model", "")),
                   calibrated_with=dict(body.get("calibrated_with", {})),
                   published_settings=dict(body.get("published_settings", {})))

    def save(self, path: Path) -> Path:
        """Written atomically; each ratio list on one line (80 numbers are easier to compare that way)."""
        head = {"format": FORMAT, "model": self.model, "source": self.source,
                "calibrated_with": dict(self.calibrated_with), "published_settings": dict(self.published_settings)}
        lines = [json.dumps(head, indent=1)[:-2] + ",", ' "ratios": {']
        names = list(self.ratios)
        for i, name in enumerate(names):
            lines.append(f"  {json.dumps(name)}: {json.dumps(list(self.ratios[name]))}" + ("," if i < len(names) - 1
                                                                                             else ""))
        lines += [" }", "}", ""]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(lines))
        tmp.replace(path)
        return path


def shipped_calibration(preset_name: str) -> Path | None:
    path = CALIBRATION_DIR / f"{preset_name}.magcache.json"
    return path if path.is_file() else None


def calibration_path(model_dir: Path) -> Path:
    """Where `particalize calibrate` writes a model's calibration: next to its weights."""
    return model_dir / CALIBRATION_NAME


def find_calibration(preset_name: str, model_dir: Path, settings: MagSettings) -> MagCalibration:
    """The calibration a MagCache run of this model uses: the file named in the settings, else the one made by
    `particalize calibrate` next to the weights, else the one shipped for the preset. None of them: refused, saying
    how to make one (never another model's ratios: a 720P run must not silently use 480P's)."""
    candidates = [settings.calibration] if settings.calibration is not None else [
        calibration_path(model_dir), shipped_calibration(preset_name)]
    for path in candidates:
        if path is not None and path.is_file():
            return MagCalibration.load(path)
    if settings.calibration is not None:
        raise MagCacheUnavailable(f"the MagCache calibration {settings.calibration} (PARTICALIZE_MAG_CALIBRATION) "
                                  "is not a file")
    raise MagCacheUnavailable(
        f"--step-cache mag needs a MagCache calibration of {preset_name}: none ships with Particalize for it and "
        f"none is at {calibration_path(model_dir)}. Make one on this model's weights with `particalize calibrate "
        f"--model {preset_name}` (one exact run on the GPU), or name a file with PARTICALIZE_MAG_CALIBRATION")


def refusal(context_parallel: str, cfg_batch: bool = False) -> str | None:
    """Why MagCache cannot run with these options, or None (checked at start, before loading)."""
    if context_parallel != "none":
        return ("--step-cache mag is not supported with context parallelism: diffusers' context-parallel plan for "
                "Wan splits the sequence at the first transformer block, where MagCache's head hook records the "
                "block input the cached residual is added to, and diffusers documents no combination of the two; "
                "run cached mode on one GPU per video (serve more videos at a time with one worker per GPU)")
    return None


def mag_config(ratios: tuple[float, ...], steps: int, settings: MagSettings,
               kind: RunKind = "cached") -> MagCacheConfig:
    """diffusers' config for a run of `steps` steps (it interpolates the ratios to that length, nearest neighbour).

    exact: no step may be skipped (K = 0). calibrate: diffusers' calibration mode (never skips, measures the ratios);
    its step count is one more than the run's, so that its end-of-run print and reset never fire (the pipeline resets
    the hooks after the run anyway) and the ratios are captured as measured (`_CapturingTailHook`)."""
    if kind == "calibrate":
        return MagCacheConfig(calibrate=True, num_inference_steps=steps + 1)
    return MagCacheConfig(threshold=settings.threshold, max_skip_steps=settings.max_skip_steps if kind == "cached"
                          else 0, retention_ratio=settings.retention_ratio, num_inference_steps=steps,
                          mag_ratios=list(ratios))


@dataclass(frozen=True)
class StepSchedule:
    """Which steps each guidance pass computed (the others reused the cached residual)."""

    steps: int
    computed: Mapping[str, tuple[int, ...]]

    def skipped(self, name: str) -> tuple[int, ...]:
        done = set(self.computed[name])
        return tuple(i for i in range(self.steps) if i not in done)

    @property
    def forwards(self) -> int:
        """Transformer forwards the run made (both passes)."""
        return sum(len(steps) for steps in self.computed.values())

    def record(self) -> dict[str, str]:
        """The steps computed and skipped, as recorded with a task's parameters (one text each; per pass when the
        passes differ)."""
        distinct = {tuple(steps) for steps in self.computed.values()}
        if len(distinct) == 1:
            name = next(iter(self.computed))
            return {"computedSteps": ranges(self.computed[name]), "skippedSteps": ranges(self.skipped(name))}
        return {"computedSteps": "; ".join(f"{name}: {ranges(steps)}" for name, steps in self.computed.items()),
                "skippedSteps": "; ".join(f"{name}: {ranges(self.skipped(name))}" for name in self.computed)}

    def describe(self) -> str:
        """One line for debugoutput and logs, e.g. "MagCache computed 11 of 30 steps (0-5, 12, 18, 23, 26, 29),
        skipped 19 (6-11, ...)", per pass when the passes differ."""
        distinct = {tuple(steps) for steps in self.computed.values()}
        parts = []
        for name, steps in self.computed.items():
            label = "" if len(distinct) == 1 else f"{name}: "
            skipped = self.skipped(name)
            parts.append(f"{label}computed {len(steps)} of {self.steps} steps ({ranges(steps)}), skipped "
                         f"{len(skipped)}" + (f" ({ranges(skipped)})" if skipped else ""))
            if len(distinct) == 1:
                break
        return "MagCache " + "; ".join(parts)


def ranges(steps: tuple[int, ...] | list[int]) -> str:
    """0,1,2,3,7,9,10 -> "0-3, 7, 9-10" (steps counted from 0)."""
    out: list[str] = []
    run: list[int] = []
    for step in steps:
        if run and step == run[-1] + 1:
            run.append(step)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [step]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(out)


def planned_schedule(calibration: MagCalibration, steps: int, settings: MagSettings,
                     passes: tuple[str, ...] = PASSES) -> StepSchedule:
    """The steps a cached run of `steps` steps will compute, known before it runs (for the record, device_check and
    RESULTS.md). A restatement of diffusers' MagCacheHeadHook decision rule, not a cache: tests check it against
    the hooks' own decisions (tests/test_step_cache_mag.py), so a diffusers change to the rule fails there."""
    computed = {}
    for name in passes:
        ratios = mag_config(calibration.for_pass(name), steps, settings).mag_ratios
        retained = int(settings.retention_ratio * steps + 0.5)
        ratio, err, run, done = 1.0, 0.0, 0, []
        for step in range(steps):
            if step >= retained:
                ratio *= float(ratios[step]) if step < len(ratios) else 1.0
                run += 1
                err += abs(1.0 - ratio)
                if step > 0 and err <= settings.threshold and run <= settings.max_skip_steps:
                    continue
                ratio, err, run = 1.0, 0.0, 0
            done.append(step)
        computed[name] = tuple(done)
    return StepSchedule(steps, computed)


class _PerPassHeadHook(MagCacheHeadHook):
    """diffusers' head hook, deciding with the config of the pass being run, and recording each decision."""

    def __init__(self, state_manager: Any, configs: dict[str, MagCacheConfig], log_: dict[str, list[bool]]) -> None:
        super().__init__(state_manager, configs["cond"])
        self.configs = configs
        self.decisions = log_

    @torch.compiler.disable
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        context = self.state_manager._context
        name = context.name if context is not None else "cond"
        self.config = self.configs.get(name, self.configs["cond"])
        output = super().new_forward(module, *args, **kwargs)
        self.decisions.setdefault(name, []).append(bool(self.state_manager.get_state().should_compute))
        return output


class _CapturingTailHook(MagCacheBlockHook):
    """diffusers' tail hook, keeping each calibration ratio it measures per pass (diffusers keeps them in the hook
    state, which the pipeline resets when the run ends)."""

    def __init__(self, state_manager: Any, config: MagCacheConfig, measured: dict[str, list[float]]) -> None:
        super().__init__(state_manager, is_tail=True, config=config)
        self.measured = measured

    def _perform_calibration_step(self, state: Any, current_residual: torch.Tensor) -> None:
        super()._perform_calibration_step(state, current_residual)
        self.measured.setdefault(self.state_manager._context.name, []).append(float(state.calibration_ratios[-1]))


class MagStepCache:
    """diffusers' MagCache hooks on a transformer, set per run by `prepare`: exact, cached or calibrating."""

    def __init__(self, transformer: torch.nn.Module, calibration: MagCalibration | None,
                 settings: MagSettings = MagSettings()) -> None:
        self.transformer = transformer
        self.calibration = calibration
        self.settings = settings
        self.decisions: dict[str, list[bool]] = {}
        self.measured: dict[str, list[float]] = {}
        self.kind: RunKind = "exact"
        self.steps = 0
        self._configs: dict[tuple[int, RunKind], dict[str, MagCacheConfig]] = {}
        self._compiled: list[tuple[Any, Any]] = []
        """(the hook's function reference, the block forward it held before `compile`)."""
        config = self._build(1, "exact")["cond"]
        try:
            transformer.enable_cache(config)
            self.head, self.blocks = self._install_own_hooks()
        except Exception:
            if transformer._cache_config is None:  # enable_cache stopped before recording it: its hooks by name
                transformer._cache_config = config
            transformer.disable_cache()
            raise

    def _build(self, steps: int, kind: RunKind) -> dict[str, MagCacheConfig]:
        key = (steps, kind)
        if key not in self._configs:
            ratios = self.calibration.for_pass if self.calibration is not None else (lambda name: (1.0,))
            self._configs[key] = {name: mag_config(ratios(name), steps, self.settings, kind) for name in PASSES}
        return self._configs[key]

    def _install_own_hooks(self) -> tuple[_PerPassHeadHook, list[MagCacheBlockHook]]:
        """Replace diffusers' head and tail hooks (registered by `enable_cache`) with the subclasses above, under
        the same names (so that diffusers' `disable_cache` removes them) and in the same order on a block (the head
        outermost, as on a one-block model, where one block carries both)."""
        head: _PerPassHeadHook | None = None
        blocks: list[MagCacheBlockHook] = []
        for module in self.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or module is self.transformer:
                continue
            old_head = registry.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK)
            block = registry.get_hook(_MAG_CACHE_BLOCK_HOOK)
            if block is not None and block.is_tail:
                registry.remove_hook(_MAG_CACHE_LEADER_BLOCK_HOOK, recurse=False)
                registry.remove_hook(_MAG_CACHE_BLOCK_HOOK, recurse=False)
                block = _CapturingTailHook(block.state_manager, block.config, self.measured)
                registry.register_hook(block, _MAG_CACHE_BLOCK_HOOK)
            if old_head is not None:
                registry.remove_hook(_MAG_CACHE_LEADER_BLOCK_HOOK, recurse=False)
                head = _PerPassHeadHook(old_head.state_manager, self._build(1, "exact"), self.decisions)
                registry.register_hook(head, _MAG_CACHE_LEADER_BLOCK_HOOK)
            if block is not None:
                blocks.append(block)
        if head is None or not any(getattr(hook, "is_tail", False) for hook in blocks):
            raise RuntimeError("diffusers' MagCache registered no head and tail hooks on this transformer's blocks")
        root = HookRegistry.check_if_exists_or_initialize(self.transformer)
        root.invalidate_child_registries_cache()  # the context setter must reach the replaced hooks
        return head, blocks

    def prepare(self, steps: int, kind: RunKind) -> None:
        """Set the hooks for the next run: its step count (ratios interpolated to it) and kind. Resets their state
        (also what an interrupted run left) and the record of decisions."""
        if kind == "cached" and self.calibration is None:
            raise MagCacheUnavailable("cached mode needs a MagCache calibration of this model")
        configs = self._build(steps, kind)
        self.head.configs = configs
        self.head.config = configs["cond"]
        for hook in self.blocks:
            hook.config = configs["cond"]  # the blocks read the step count (and calibrate) only
        self.transformer._reset_stateful_cache()
        self.decisions.clear()
        self.measured.clear()
        self.kind, self.steps = kind, steps

    def schedule(self) -> StepSchedule:
        """What the hooks decided in the last run, per pass."""
        computed = {name: tuple(i for i, done in enumerate(flags) if done) for name, flags in self.decisions.items()}
        return StepSchedule(self.steps, computed)

    def measured_calibration(self, source: str, model: str, calibrated_with: Mapping[str, Any]) -> MagCalibration:
        """The ratios diffusers' calibration measured in the last (calibrate) run, per pass."""
        if self.kind != "calibrate" or not self.measured:
            raise RuntimeError("no calibration run has been made with these hooks")
        short = {name: len(r) for name, r in self.measured.items() if len(r) != self.steps}
        if short:
            raise RuntimeError(f"the calibration run measured {short} ratios, not {self.steps} per pass")
        return MagCalibration(ratios={name: tuple(values) for name, values in self.measured.items()},
                              source=source, model=model, calibrated_with=dict(calibrated_with),
                              published_settings={"threshold": self.settings.threshold,
                                                  "max_skip_steps": self.settings.max_skip_steps,
                                                  "retention_ratio": self.settings.retention_ratio})

    def compile(self, *, fullgraph: bool, dynamic: bool, mode: str | None) -> None:
        """Compile each block's own forward under the hooks (one graph shared by every block: the same code)."""
        for module in self.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or module is self.transformer:
                continue
            for name in (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK):
                hook = registry.get_hook(name)
                forward = hook.fn_ref.original_forward if hook is not None else None
                if getattr(forward, "__self__", None) is module:  # the block's own forward, not an inner hook's
                    self._compiled.append((hook.fn_ref, forward))
                    hook.fn_ref.original_forward = torch.compile(forward, fullgraph=fullgraph, dynamic=dynamic,
                                                                 mode=mode)

    @property
    def compiled(self) -> bool:
        return bool(self._compiled)

    def uncompile(self) -> None:
        for ref, forward in self._compiled:
            ref.original_forward = forward
        self._compiled.clear()

    def remove(self) -> None:
        """Every hook off (compiled forwards first, so that no block keeps a compiled forward as its own)."""
        self.uncompile()
        if self.transformer._cache_config is not None:
            self.transformer.disable_cache()

