"""Fast mode: a step-distilled LoRA (switched on per request) with the sampling its authors distilled it for.

lightx2v's Wan2.1-I2V-14B-480P StepDistill-CfgDistill LoRA (huggingface.co/lightx2v/Wan2.1-Distill-Loras,
`wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors`; an example, never a default: the operator names the file)
was distilled for 4 steps without classifier-free guidance. Their config (LightX2V
configs/distill/wan21/wan_i2v_distill_lora_4step_cfg.json) gives `infer_steps` 4, `denoising_step_list`
[1000, 750, 500, 250], `sample_shift` 5 and `enable_cfg` false, sampled by their WanStepDistillScheduler: Euler
steps over those timesteps' shifted sigmas (pipeline/scheduler.py, StepDistillScheduler). Guidance scale 1 means
one transformer forward per step: 4 forwards per video instead of 60 (30 steps x 2 with guidance).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.params import GenerationParams

NORMAL = "normal"
CACHED = "cached"
"""Calibrated step skipping (MagCache, pipeline.speed.step_cache_mag): the request's own steps, scale and shift."""
FAST = "fast"
MODES = (NORMAL, CACHED, FAST)


@dataclass(frozen=True)
class FastMode:
    steps: int = 4
    scale: float = 1.0
    flow_shift: float = 5.0

    def apply(self, params: GenerationParams) -> GenerationParams:
        """The parameters a fast-mode run uses: the distilled schedule replaces steps, scale and flowShift
        (other values would run the LoRA off the schedule it was trained for)."""
        return params.model_copy(update={"mode": FAST, "steps": self.steps, "scale": self.scale,
                                         "flow_shift": self.flow_shift})
