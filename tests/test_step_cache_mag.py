"""MagCache step skipping (pipeline/speed/step_cache_mag.py): the shipped calibration, the schedules it gives, and
frames bit-equal to a plain diffusers pipeline with diffusers' own MagCacheConfig, on the tiny CPU model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import Interrupted, InvalidParameter
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.params import GenerationParams, Limits, check_limits
from pipeline.presets import get_preset
from pipeline.speed.acceleration import SpeedOptions
from pipeline.speed.step_cache_mag import (
    CALIBRATION_NAME,
    MagCacheUnavailable,
    MagCalibration,
    MagSettings,
    StepSchedule,
    find_calibration,
    planned_schedule,
    ranges,
    refusal,
    shipped_calibration,
)
from tests.images import noise_image

PUBLISHED = shipped_calibration("wan2.1-i2v-14b-480p")
IMAGE = noise_image(32, 32)
PARAMS = GenerationParams(width=32, height=32, numFrames=5, steps=30, seed=7, prompt="crystal shards",
                          mode="cached")
# Worked out by hand from diffusers' MagCacheHeadHook rule and LightX2V's ratios (the issue's arithmetic): with
# threshold 0.24, K 6, retention 0.2, both passes compute these steps.
AT_30 = (0, 1, 2, 3, 4, 5, 12, 18, 23, 26, 29)
AT_40 = (0, 1, 2, 3, 4, 5, 6, 7, 14, 20, 25, 30, 34, 37, 39)
AT_30_THRESHOLD_006 = (0, 1, 2, 3, 4, 5, 9, 12, 15, 18, 20, 22, 24, 26, 27, 28, 29)


def published() -> MagCalibration:
    assert PUBLISHED is not None
    return MagCalibration.load(PUBLISHED)


def make(tmp: Path, settings: MagSettings | None = None, **speed) -> VideoGenerator:
    mag = settings or MagSettings(calibration=PUBLISHED)
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, speed=SpeedOptions(step_cache="mag", mag=mag,
                                                                                       **speed)))


def plain_pipeline_frames(gen: VideoGenerator, params: GenerationParams, config: object | None) -> np.ndarray:
    """A fresh tiny diffusers pipeline called directly (no project code in its run), with `config` as its cache."""
    from pipeline.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if config is not None:
        pipe.transformer.enable_cache(config)
    return pipe(image=IMAGE, prompt=params.prompt, negative_prompt=params.negative_prompt, height=params.height,
                width=params.width, num_frames=params.num_frames, num_inference_steps=params.steps,
                guidance_scale=params.scale, generator=torch.Generator("cpu").manual_seed(params.seed),
                output_type="np", max_sequence_length=gen.max_sequence_length).frames[0]


def test_the_published_480p_calibration_ships_with_its_source_and_one_list_per_guidance_pass():
    calibration = published()
    assert set(calibration.ratios) == {"cond", "uncond"} and calibration.steps == 40
    assert len(calibration.ratios["uncond"]) == 40
    assert "ModelTC/LightX2V" in calibration.source and "wan_i2v_mag_480p.json" in calibration.source
    assert calibration.ratios["cond"][:3] == (1.0, 0.98783, 0.97559)  # LightX2V's magcache_ratios[0]
    assert calibration.ratios["uncond"][:3] == (1.0, 0.98993, 0.97593)  # and [1]
    assert dict(calibration.published_settings) == {"threshold": 0.24, "max_skip_steps": 6, "retention_ratio": 0.2}
    assert MagSettings() == MagSettings(threshold=0.24, max_skip_steps=6, retention_ratio=0.2)
    assert shipped_calibration("wan2.1-i2v-14b-720p") is None  # none published: never 480P's in its place


@pytest.mark.parametrize(("steps", "threshold", "expected"), [(30, 0.24, AT_30), (40, 0.24, AT_40),
                                                              (30, 0.06, AT_30_THRESHOLD_006)])
def test_the_published_calibration_computes_11_of_30_and_15_of_40_steps(steps, threshold, expected):
    schedule = planned_schedule(published(), steps, MagSettings(threshold=threshold))
    assert schedule.computed == {"cond": expected, "uncond": expected}
    assert schedule.forwards == 2 * len(expected)


def test_cached_frames_are_bit_equal_to_a_plain_diffusers_pipeline_with_magcacheconfig(tmp_path):
    """Same ratios (the conditional list, which at 30 steps gives the unconditional list's schedule), same settings:
    diffusers' own hook on a plain pipeline and the project's warm generator make the same frames, bit for bit. The
    hooks' decisions are the planned schedule; an exact run through the same hooks is the uncached pipeline's."""
    from diffusers import MagCacheConfig

    gen = make(tmp_path)
    video = gen.generate(PARAMS, IMAGE)
    assert video.params.mode == "cached"
    assert video.schedule is not None and video.schedule.computed == {"cond": AT_30, "uncond": AT_30}
    assert video.schedule == planned_schedule(published(), 30, MagSettings())
    assert "MagCache computed 11 of 30 steps (0-5, 12, 18, 23, 26, 29), skipped 19" in video.notes[-1]
    config = MagCacheConfig(threshold=0.24, max_skip_steps=6, retention_ratio=0.2, num_inference_steps=30,
                            mag_ratios=list(published().ratios["cond"]))
    np.testing.assert_array_equal(video.frames, plain_pipeline_frames(gen, PARAMS, config))

    exact = gen.generate(PARAMS.model_copy(update={"mode": "normal"}), IMAGE)
    assert exact.schedule is None and gen.applied.mag.schedule().computed == {"cond": tuple(range(30)),
                                                                              "uncond": tuple(range(30))}
    np.testing.assert_array_equal(exact.frames, plain_pipeline_frames(gen, PARAMS, None))
    assert np.abs(exact.frames - video.frames).max() > 0  # skipping really changed something


def test_the_hooks_decide_the_planned_schedule_at_40_steps_and_at_another_threshold(tmp_path):
    small = PARAMS.model_copy(update={"numFrames": 1, "width": 16, "height": 16})
    gen = make(tmp_path)
    assert gen.generate(small.model_copy(update={"steps": 40}), IMAGE).schedule.computed["cond"] == AT_40
    lower = make(tmp_path, MagSettings(threshold=0.06, calibration=PUBLISHED))
    assert lower.generate(small, IMAGE).schedule.computed == {"cond": AT_30_THRESHOLD_006,
                                                              "uncond": AT_30_THRESHOLD_006}


def test_each_guidance_pass_decides_with_its_own_ratios(tmp_path):
    """A calibration whose unconditional curve is flat (ratio 1: nothing changes) skips that pass as often as K
    allows, while the conditional pass keeps the published schedule: each pass reads its own list."""
    flat = MagCalibration(ratios={"cond": published().ratios["cond"], "uncond": (1.0,) * 40}, source="test")
    path = flat.save(tmp_path / "flat.json")
    gen = make(tmp_path, MagSettings(calibration=path))
    small = PARAMS.model_copy(update={"numFrames": 1, "width": 16, "height": 16})
    schedule = gen.generate(small, IMAGE).schedule
    assert schedule.computed["cond"] == AT_30
    assert schedule.computed["uncond"] == (0, 1, 2, 3, 4, 5, 12, 19, 26)  # 6 retained, then K = 6 skipped, 1 computed
    assert schedule == planned_schedule(flat, 30, MagSettings())
    assert "cond: computed 11 of 30" in schedule.describe() and "uncond: computed 9 of 30" in schedule.describe()


def test_no_guidance_runs_the_conditional_pass_alone(tmp_path):
    gen = make(tmp_path)
    small = PARAMS.model_copy(update={"numFrames": 1, "width": 16, "height": 16, "scale": 1.0})
    assert gen.generate(small, IMAGE).schedule.computed == {"cond": AT_30}


def test_an_interrupted_cached_run_leaves_no_state_for_the_next(tmp_path):
    small = PARAMS.model_copy(update={"numFrames": 1, "width": 16, "height": 16, "steps": 12})
    gen = make(tmp_path)
    first = gen.generate(small, IMAGE).frames
    with pytest.raises(Interrupted):
        gen.generate(small, IMAGE, should_stop=lambda: True)  # stops after step 1, hooks half way
    np.testing.assert_array_equal(gen.generate(small, IMAGE).frames, first)


def test_a_calibration_next_to_the_weights_wins_over_the_shipped_one_and_a_missing_one_is_refused(tmp_path):
    assert find_calibration("wan2.1-i2v-14b-480p", tmp_path / "480p", MagSettings()).source == published().source
    own = MagCalibration(ratios={"cond": (1.0, 0.9), "uncond": (1.0, 0.8)}, source="particalize calibrate")
    own.save(tmp_path / "480p" / CALIBRATION_NAME)
    assert find_calibration("wan2.1-i2v-14b-480p", tmp_path / "480p", MagSettings()) == own
    with pytest.raises(MagCacheUnavailable, match="particalize calibrate --model wan2.1-i2v-14b-720p"):
        find_calibration("wan2.1-i2v-14b-720p", tmp_path / "720p", MagSettings())
    with pytest.raises(MagCacheUnavailable, match="is not a file"):
        find_calibration("wan2.1-i2v-14b-480p", tmp_path, MagSettings(calibration=tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"ratios": {"cond": [1.0], "uncond": [1.0, 0.9]}}))
    with pytest.raises(MagCacheUnavailable, match="same length"):
        MagCalibration.load(tmp_path / "bad.json")


def test_the_720p_preset_without_a_calibration_is_refused_at_start_saying_how_to_calibrate(tmp_path):
    options = GeneratorOptions(get_preset("wan2.1-i2v-14b-720p"), tmp_path, speed=SpeedOptions(step_cache="mag"))
    with pytest.raises(MagCacheUnavailable, match="none ships with Particalize for it.*particalize calibrate"):
        VideoGenerator(options)  # before any weights are looked for (there are none here)


def test_cached_mode_is_refused_without_the_step_cache(tmp_path):
    with pytest.raises(InvalidParameter, match=r"\[mode\].*PARTICALIZE_STEP_CACHE=mag"):
        check_limits(PARAMS, Limits())
    check_limits(PARAMS, Limits(cached_mode=True))
    plain = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path))
    with pytest.raises(InvalidParameter, match="cached"):
        plain.resolve(PARAMS, IMAGE)
    with pytest.raises(MagCacheUnavailable, match="--step-cache mag"):
        VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path, mode="cached"))


def test_context_parallelism_is_refused_with_the_reason():
    assert refusal("none") is None
    assert "first transformer block" in refusal("ulysses")


def test_a_step_cache_that_fails_to_install_falls_back_leaving_no_hook_and_cached_requests_refused(tmp_path,
                                                                                                  monkeypatch):
    from pipeline.speed import step_cache_mag

    def broken(self: object) -> None:
        raise TypeError("a renamed hook")

    monkeypatch.setattr(step_cache_mag.MagStepCache, "_install_own_hooks", broken)
    gen = make(tmp_path)
    assert gen.applied.mag is None and gen.applied.step_cache == "none"
    assert any("step cache mag" in f and "a renamed hook" in f for f in gen.applied.fallbacks)
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks
                   for m in gen.pipe.transformer.modules())
    with pytest.raises(InvalidParameter, match="fell back"):
        gen.resolve(PARAMS, IMAGE)


def test_ranges_and_the_schedule_line():
    assert ranges([0, 1, 2, 3, 7, 9, 10]) == "0-3, 7, 9-10"
    line = StepSchedule(4, {"cond": (0, 1, 3), "uncond": (0, 1, 3)}).describe()
    assert line == "MagCache computed 3 of 4 steps (0-1, 3), skipped 1 (2)"


# --- the request's mode -------------------------------------------------------------------------------------------

def test_cached_mode_through_the_api_shown_in_tool_detail_and_recorded_with_its_steps(tmp_path):
    from fastapi.testclient import TestClient

    from particalize.compose_server import build_app
    from tests.conftest import make_settings
    from tests.images import png_bytes
    from tests.test_api import RUN, SMALL, Api, run_worker_once

    settings = make_settings(tmp_path, step_cache="mag", mag_calibration=PUBLISHED)
    gen = make(tmp_path)
    with TestClient(build_app(settings)) as client:
        api = Api(client)
        tool = client.post("/v1/Tool/Detail", json={"slugowner": "codexq", "slugproject": "particalize"}).json()
        advanced = tool["tool"][0]["parameters"][-1]
        (mode,) = advanced["items"]
        assert advanced["title"] == "Advanced" and mode["advanced"] is True and mode["default"] == "normal"
        assert [o["value"] for o in mode["options"]] == ["normal", "cached"]  # no speed LoRA here: no fast
        assert "cached: " in mode["description"] and "fast: " not in mode["description"]
        run = client.post(RUN, data={**SMALL, "steps": "10", "mode": "cached"},
                          files={"inputImage": ("in.png", png_bytes(32, 32), "image/png")}).json()
        assert run["result"] is True
        assert run_worker_once(client, settings, gen)
        task = api.detail(taskid=run["taskid"])["tasklist"][0]
        assert task["pexit"] == "0", task["debugerror"]
        planned = planned_schedule(published(), 10, MagSettings())
        assert planned.computed["cond"] == (0, 1, 7)  # at 10 steps: 2 retained, then 5 skipped before 0.24
        assert {k: task["parameters"][k] for k in ("mode", "steps", "computedSteps", "skippedSteps")} == {
            "mode": "cached", "steps": "10", "computedSteps": "0-1, 7", "skippedSteps": "2-6, 8-9"}
        assert "MagCache computed 3 of 10 steps (0-1, 7), skipped 7 (2-6, 8-9)" in task["debugoutput"]

        normal = client.post(RUN, data={**SMALL, "mode": "normal"},
                             files={"inputImage": ("in.png", png_bytes(32, 32), "image/png")}).json()
        assert run_worker_once(client, settings, gen)
        task = api.detail(taskid=normal["taskid"])["tasklist"][0]
        assert task["pexit"] == "0" and "computedSteps" not in task["parameters"]
        assert "MagCache" not in task["debugoutput"]


def test_cached_mode_resolves_once_through_modes_and_a_refusal_names_the_modes_offered():
    from pipeline.fast import FastMode
    from pipeline.resolve import Modes, resolve_request, with_mode

    offered = Modes(cached=True)
    resolved = resolve_request(PARAMS, IMAGE.size, Limits(cached_mode=True), offered)
    assert (resolved.mode, resolved.steps, resolved.scale, resolved.flow_shift) == ("cached", 30, 5.0, 5.0)
    assert with_mode(PARAMS.model_copy(update={"mode": None}), Modes("cached", cached=True)).mode == "cached"
    assert with_mode(PARAMS.model_copy(update={"mode": None}), offered).mode == "normal"
    assert offered.offered == ("normal", "cached") and Modes(fast=FastMode(), cached=True).offered == (
        "normal", "cached", "fast")

    with pytest.raises(InvalidParameter, match=r"\[mode\] must be 'normal' on this server \(cached mode needs"):
        with_mode(PARAMS, Modes())
    with pytest.raises(InvalidParameter, match=r"must be 'normal' or 'fast' on this server \(cached mode needs the "
                                               r"MagCache step cache: PARTICALIZE_STEP_CACHE=mag\), got 'cached'\."):
        with_mode(PARAMS, Modes(fast=FastMode()))
    with pytest.raises(InvalidParameter, match=r"must be 'normal' or 'cached' on this server \(fast mode needs"):
        with_mode(PARAMS.model_copy(update={"mode": "fast"}), offered)
    with pytest.raises(InvalidParameter, match=r"fell back.*got 'cached'"):
        with_mode(PARAMS, Modes(cached_note=" (its hooks fell back at start: see /ready)"))
    # Run's check of the request says the same, from the server's limits
    with pytest.raises(InvalidParameter, match=r"\[mode\] must be 'normal' or 'cached' on this server \(fast"):
        check_limits(PARAMS.model_copy(update={"mode": "fast"}), Limits(cached_mode=True))
    with pytest.raises(InvalidParameter, match=r"\[mode\] must be 'normal' or 'fast' on this server \(cached"):
        check_limits(PARAMS, Limits(fast_mode=True))


def test_the_generators_modes_offer_cached_only_with_its_hooks_on_and_a_resolved_cached_task_runs_as_it_is(tmp_path):
    from pipeline.resolve import Modes, resolve_request

    gen = make(tmp_path)
    assert gen.modes == Modes("normal", None, cached=True)
    at_run = resolve_request(PARAMS.model_copy(update={"steps": 10}), IMAGE.size, Limits(cached_mode=True),
                             Modes(cached=True))  # as the API process resolves a Run with an image sent
    assert gen.resolve(at_run, IMAGE) is at_run  # already resolved: as it is
    video = gen.generate(at_run, IMAGE)
    assert video.params == at_run and video.schedule == planned_schedule(published(), 10, MagSettings())

    plain = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path))
    assert plain.modes == Modes() and not plain.modes.cached
    with pytest.raises(InvalidParameter, match=r"must be 'normal' on this server \(cached mode needs"):
        plain.generate(at_run, IMAGE)  # resolved for hooks this worker does not have: refused, not run exact


def test_run_refuses_cached_mode_with_code_0_where_not_offered_and_the_worker_resolves_an_image_url(tmp_path):
    from fastapi.testclient import TestClient

    from particalize.compose_server import build_app
    from particalize.core_options import worker_options
    from server.worker import Worker
    from tests.conftest import make_settings
    from tests.images import png_bytes
    from tests.test_api import RUN, SMALL, Api, assert_error

    url = "http://127.0.0.1:9/dog.png"
    with TestClient(build_app(make_settings(tmp_path / "plain"))) as client:
        answer = client.post(RUN, json={"inputImageUrl": url, **SMALL, "mode": "cached"})
        assert_error(answer, 0, contains="Request parameter [mode] must be 'normal' on this server (cached mode needs "
                                         "the MagCache step cache: PARTICALIZE_STEP_CACHE=mag), got 'cached'.")
        assert Api(client).task_count() == 0

    settings = make_settings(tmp_path, step_cache="mag", mag_calibration=PUBLISHED, allow_private_urls=True)
    with TestClient(build_app(settings)) as client:
        api, services = Api(client), client.app.state.services

        def work(generator: VideoGenerator) -> None:
            worker = Worker(services.store, services.storage, generator, worker_options(settings),
                            worker_id="testnode/gpu0", fetch=lambda url, **_: (png_bytes(32, 32), "image/png"))
            assert worker.run_once()

        run = client.post(RUN, json={"inputImageUrl": url, **SMALL, "steps": "10", "mode": "cached"}).json()
        assert run["result"] is True
        work(make(tmp_path / "w"))  # resolved in the worker, with the generator's modes
        task = api.detail(taskid=run["taskid"])["tasklist"][0]
        assert task["pexit"] == "0", task["debugerror"]
        assert {k: task["parameters"][k] for k in ("mode", "computedSteps", "skippedSteps")} == {
            "mode": "cached", "computedSteps": "0-1, 7", "skippedSteps": "2-6, 8-9"}
        assert "MagCache computed 3 of 10 steps" in task["debugoutput"]

        run = client.post(RUN, json={"inputImageUrl": url, **SMALL, "mode": "cached"}).json()
        work(VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path / "p")))  # a worker without the hooks
        task = api.detail(taskid=run["taskid"])["tasklist"][0]
        assert task["pexit"] != "0"
        assert "[mode] must be 'normal' on this server (cached mode needs" in task["debugerror"]


def test_tool_detail_offers_every_mode_the_server_has():
    from pipeline.inputs import tool_inputs

    def choices(limits: Limits) -> tuple[str, ...]:
        return next((spec.choices for spec in tool_inputs(limits) if spec.name == "mode"), ())

    assert choices(Limits()) == ()  # neither: no mode input at all
    assert choices(Limits(fast_mode=True)) == ("normal", "fast")
    assert choices(Limits(cached_mode=True)) == ("normal", "cached")
    assert choices(Limits(fast_mode=True, cached_mode=True)) == ("normal", "cached", "fast")


# --- particalize calibrate ----------------------------------------------------------------------------------------

def test_calibrate_writes_a_ratio_file_next_to_the_weights_that_verify_checks_and_a_second_run_loads(tmp_path,
                                                                                                    capsys):
    from particalize.cli import main
    from pipeline.speed.step_cache_mag import calibration_path

    IMAGE.save(tmp_path / "in.png")
    weights = tmp_path / "weights"
    argv = ["calibrate", "--model", "tiny", "--weights-dir", str(weights), "--image", str(tmp_path / "in.png"),
            "--steps", "6", "--width", "16", "--height", "16", "--num-frames", "1", "--seed", "3"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    path = calibration_path(weights / "tiny")
    assert report["calibration"] == str(path) and report["steps"] == 6 and report["passes"] == ["cond", "uncond"]
    calibration = MagCalibration.load(path)
    assert {name: len(r) for name, r in calibration.ratios.items()} == {"cond": 6, "uncond": 6}
    assert calibration.ratios["cond"][0] == 1.0 and all(0.1 < r < 10 for r in calibration.ratios["cond"])
    assert calibration.ratios["cond"] != calibration.ratios["uncond"]  # each pass measured on its own
    assert calibration.calibrated_with["steps"] == 6 and "particalize calibrate" in calibration.source

    # a second run loads it (next to the weights; nothing named) and decides with it
    gen = VideoGenerator(GeneratorOptions(get_preset("tiny"), weights, speed=SpeedOptions(step_cache="mag")))
    assert gen.applied.mag.calibration == calibration
    small = PARAMS.model_copy(update={"numFrames": 1, "width": 16, "height": 16, "steps": 12})
    assert gen.generate(small, IMAGE).schedule == planned_schedule(calibration, 12, MagSettings())

    # recorded in the manifest: verify checks it, and says so when it changed
    assert main(["weights", "verify", "--model", "tiny", "--weights-dir", str(weights)]) == 0
    assert "1 files checked" in capsys.readouterr().out
    path.write_text(path.read_text().replace('"format": 1', '"format": 2'))  # same size: only the hash tells
    assert main(["weights", "verify", "--model", "tiny", "--weights-dir", str(weights), "--quick"]) == 0
    capsys.readouterr()
    assert main(["weights", "verify", "--model", "tiny", "--weights-dir", str(weights)]) == 1
    assert "differs from the one recorded when it was made here" in capsys.readouterr().out


def test_a_fetch_keeps_the_records_of_files_made_here(tmp_path):
    from weights.manifest import FileRecord, local_records, read_manifest, record_local_file, write_manifest

    write_manifest(tmp_path, "Wan-AI/x", "abc", [FileRecord("model_index.json", 10, None)])
    (tmp_path / CALIBRATION_NAME).write_text("{}")
    record_local_file(tmp_path, CALIBRATION_NAME)
    manifest = read_manifest(tmp_path)
    assert manifest["repo_id"] == "Wan-AI/x" and set(manifest["files"]) == {"model_index.json", CALIBRATION_NAME}
    assert [r.path for r in local_records(manifest)] == [CALIBRATION_NAME]  # what fetch_model writes back


# --- compile, context parallelism ---------------------------------------------------------------------------------

def test_under_compile_the_blocks_run_compiled_beneath_the_hooks_and_nothing_recompiles_from_step_to_step(tmp_path):
    """diffusers' MagCache hooks are compiler-disabled: compiling the block around them would leave it eager (and
    fail fullgraph). The blocks' own forwards are compiled under the hooks instead: one graph, warmed up at start,
    reused by every block, every step (computed or skipped), both passes, both modes and a new step count."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    small = PARAMS.model_copy(update={"steps": 12})  # (a one-token video would recompile for its size 1 anyway)
    torch._dynamo.reset()
    counters.clear()
    try:
        gen = make(tmp_path, compile=True)
        assert gen.applied.compiled and not gen.applied.fallbacks
        forwards = [hook.fn_ref.original_forward for hook in (gen.applied.mag.head, *gen.applied.mag.blocks)]
        assert all(hasattr(f, "_torchdynamo_orig_callable") for f in forwards)  # compiled, under the hooks
        warmed = counters["stats"]["unique_graphs"]
        assert warmed == 1  # one graph for every block
        torch._dynamo.config.error_on_recompile = True
        cached = gen.generate(small, IMAGE)
        exact = gen.generate(small.model_copy(update={"mode": "normal"}), IMAGE)
        again = gen.generate(small.model_copy(update={"steps": 30}), IMAGE)
        assert counters["stats"]["unique_graphs"] == warmed
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    assert again.schedule.computed["cond"] == AT_30
    assert cached.schedule == planned_schedule(published(), 12, MagSettings())
    eager = make(tmp_path)
    np.testing.assert_allclose(cached.frames, eager.generate(small, IMAGE).frames, atol=1e-4)
    np.testing.assert_allclose(exact.frames, eager.generate(small.model_copy(update={"mode": "normal"}), IMAGE).frames,
                               atol=1e-4)
    gen.applied.mag.remove()
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks
                   for m in gen.pipe.transformer.modules())
    for block in gen.pipe.transformer.blocks:  # no compiled forward left on a block
        assert block.forward.__func__ is type(block).forward


def test_mag_under_context_parallelism_is_refused_before_any_process_starts(tmp_path):
    from particalize.compose import parallel_refusal
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, step_cache="mag", context_parallel="ulysses", parallel_degree=2)
    assert "not supported with context parallelism" in parallel_refusal(settings)


def test_with_a_lora_stack_the_cached_run_keeps_its_schedule_and_the_lora_its_effect(tmp_path):
    """The hooks sit on the blocks, the LoRA layers inside them: neither changes the other."""
    from pipeline.lora.stack import LoraStackOptions
    from tests.lora_files import make_weights, write_lora

    small = PARAMS.model_copy(update={"numFrames": 1, "width": 16, "height": 16, "steps": 12})
    base = make(tmp_path)
    lora = write_lora(tmp_path / "l.safetensors", make_weights(base.pipe.transformer), "kohya")
    stacked = VideoGenerator(GeneratorOptions(
        get_preset("tiny"), tmp_path, loras=LoraStackOptions(loras=((lora, 1.0), (lora, 0.5))),
        speed=SpeedOptions(step_cache="mag", mag=MagSettings(calibration=PUBLISHED))))
    with_lora = stacked.generate(small, IMAGE)
    without = base.generate(small, IMAGE)
    assert with_lora.schedule == without.schedule == planned_schedule(published(), 12, MagSettings())
    assert np.abs(with_lora.frames - without.frames).max() > 1e-3
