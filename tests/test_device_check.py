"""benchmarks.device_check --small runs every part to completion on the CPU, so the one GPU run it is written for
does not fail on a bug that a CPU could have shown."""

from __future__ import annotations

import json
import os

from benchmarks import device_check

PARTS = ("build", "eager_step", "attention", "compile", "warm_restart", "default_step", "profile", "fast_mode",
         "cached_mode", "vae_decode", "text_encoder_cpu", "float8", "text_encoder_cpu_encode", "context_parallel")


def test_device_check_small_runs_every_part_and_writes_its_table(tmp_path, monkeypatch, capsys):
    import torch._dynamo
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    # the warm-restart part points these at fresh directories; give them back afterwards
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir())
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    out = tmp_path / "check.json"
    try:
        code = device_check.main(["--small", "--fused-lora-rank", "2", "--out", str(out)])
    finally:
        torch._dynamo.reset()
    body = json.loads(out.read_text())
    assert code == 0, {k: v.get("error") for k, v in body["parts"].items()}
    assert set(body["parts"]) == set(PARTS)
    assert not any("error" in part or "skipped" in part for part in body["parts"].values())
    assert body["parts"]["warm_restart"]["cache_loaded"] is True
    assert body["parts"]["compile"]["cache_mb"] > 0
    assert body["parts"]["float8"]["notes"]  # on a CPU: refused, with the reason
    rows = {r["what"]: r for r in body["rows"]}
    assert rows["step, eager SDPA (old default), CFG"]["value"] > 0
    assert rows["fast mode video (4 steps, scale 1, encoders + VAE)"]["value"] > 0
    assert "attention sdpa" in rows
    assert body["parts"]["profile"]["top_by_time"][0]["ms"] > 0
    assert body["parts"]["context_parallel"]["degrees"]["2"]["step_s"] > 0  # 2 gloo processes on the CPU
    fast = body["parts"]["fast_mode"]  # the real fast mode: a speed LoRA through LoraStack, the distilled schedule
    assert "fast mode only" in fast["lora"] and "layers rank 4" in fast["lora"]
    assert (fast["steps"], fast["scale"]) == (4, 1.0) and fast["frames_shape"][0] == 9
    assert fast["graphs_compiled"] >= 1 and fast["recompiles_in_video"] == 0  # the adapter graph, compiled once
    cached = body["parts"]["cached_mode"]  # MagCache with the published calibration, compiled beneath its hooks
    assert cached["computed_per_pass"] == {"cond": 11, "uncond": 11} and cached["matches_plan"] is True
    assert cached["first_run_compiling_s"] > 0 and cached["video_s"] > 0 and cached["frames_shape"][0] == 9
    assert cached["planned"]["40"]["computedSteps"] == "0-7, 14, 20, 25, 30, 34, 37, 39"
    assert rows["cached mode video (30 steps, CFG, MagCache, encoders + VAE)"]["value"] > 0
    printed = capsys.readouterr().out
    assert "device check" in printed and "forward, compiled" in printed


def test_default_path_small_makes_the_video_a_worker_would_and_records_its_times(tmp_path):
    """benchmarks.default_path (the server's default path, end to end) on the tiny preset: the MP4 has every frame,
    each phase is timed, nothing fell back."""
    from benchmarks import default_path

    out = tmp_path / "default-path.json"
    code = default_path.main(["--small", "--data-dir", str(tmp_path / "data"), "--steps", "3", "--out", str(out)])
    body = json.loads(out.read_text())
    assert code == 0
    assert body["mp4"]["frames"] == 9 and body["mp4"]["size"] == [48, 32]
    assert len(body["steps_s"]) == 2 and body["step_s"] > 0
    assert body["load_s"] > 0 and body["request_s"] >= body["first_step_s"] > 0
    assert body["applied"]["fallbacks"] == [] and body["degraded"] == []
    assert any("ready on cpu" in line for line in body["log"])
