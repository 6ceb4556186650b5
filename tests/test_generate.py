"""Generation on the tiny preset: the video a request asks for is the video that comes out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import Interrupted
from pipeline.generator import GeneratorOptions, StepProgress, VideoGenerator
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.video import read_mp4
from tests.images import noise_image


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> VideoGenerator:
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path_factory.mktemp("weights")))


def small(**kw) -> GenerationParams:
    base = dict(width=32, height=32, numFrames=9, steps=2, seed=1)
    return GenerationParams(**{**base, **kw})


def test_mp4_has_the_asked_frames_fps_and_size(gen, tmp_path):
    out = tmp_path / "v.mp4"
    video = gen.render(small(numFrames=13, fps=12, width=48, height=32), noise_image(60, 40), out)
    meta, frames = read_mp4(out)
    assert frames.shape == (13, 32, 48, 3)
    assert meta["fps"] == 12
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert video.params.width == 48 and video.params.height == 32
    assert not [p for p in tmp_path.iterdir() if p.name != "v.mp4"], "no temp files left behind"


def test_same_seed_same_video_other_seed_different(gen):
    image = noise_image(32, 32)
    a = gen.generate(small(seed=5), image).frames
    b = gen.generate(small(seed=5), image).frames
    c = gen.generate(small(seed=6), image).frames
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_prompt_changes_the_video(gen):
    image = noise_image(32, 32)
    a = gen.generate(small(prompt="glass shards"), image).frames
    b = gen.generate(small(prompt="white dust"), image).frames
    assert np.abs(a - b).max() > 1e-4


def test_flow_shift_is_applied_per_request_without_reloading(gen):
    image = noise_image(32, 32)
    transformer = gen.pipe.transformer
    a = gen.generate(small(flowShift=5.0), image).frames
    b = gen.generate(small(flowShift=1.0), image).frames
    assert gen.pipe.scheduler.config.flow_shift == 1.0
    assert gen.pipe.transformer is transformer
    assert np.abs(a - b).max() > 1e-4
    np.testing.assert_array_equal(gen.generate(small(flowShift=5.0), image).frames, a)


def test_random_seed_is_recorded_and_reproduces(gen):
    image = noise_image(32, 32)
    first = gen.generate(small(seed=None), image)
    assert first.params.seed is not None
    again = gen.generate(small(seed=first.params.seed), image)
    np.testing.assert_array_equal(first.frames, again.frames)


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [((40, 60), (48, 80)), ((60, 40), (80, 48)), ((50, 50), (48, 48)), ((832, 480), (80, 48))],
    ids=["portrait", "landscape", "square", "wan-landscape"],
)
def test_zero_size_follows_the_image_aspect_ratio(gen, image_size, expected):
    video = gen.generate(small(width=0, height=0, numFrames=5, steps=1), noise_image(*image_size))
    assert (video.params.width, video.params.height) == expected
    assert video.frames.shape[1:3] == (expected[1], expected[0])
    img_aspect = image_size[0] / image_size[1]
    assert abs(np.log((expected[0] / expected[1]) / img_aspect)) < 0.3


def test_one_side_given_the_other_follows_the_image(gen):
    video = gen.generate(small(width=64, height=0, numFrames=5, steps=1), noise_image(100, 50))
    assert (video.params.width, video.params.height) == (64, 32)


class Stop:
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.seen: list[int] = []
        self.flag = False

    def progress(self, p: StepProgress) -> None:
        self.seen.append(p.step)
        if p.step == self.at_step:
            self.flag = True


def test_interrupt_at_step_k_stops_after_step_k_and_the_warm_model_goes_on(gen):
    image = noise_image(32, 32)
    stop = Stop(at_step=2)
    with pytest.raises(Interrupted) as info:
        gen.generate(small(steps=5), image, progress=stop.progress, should_stop=lambda: stop.flag)
    assert (info.value.step, info.value.total) == (2, 5)
    assert stop.seen == [1, 2]
    pipe = gen.pipe
    after = gen.generate(small(steps=2), image)
    assert gen.pipe is pipe
    np.testing.assert_array_equal(after.frames, gen.generate(small(steps=2), image).frames)


def test_progress_reports_every_step(gen):
    seen: list[tuple[int, int]] = []
    gen.generate(small(steps=3), noise_image(32, 32), progress=lambda p: seen.append((p.step, p.total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_cli_generate_writes_the_video(tmp_path: Path):
    from particalize.cli import main

    noise_image(40, 60).save(tmp_path / "in.png")
    out = tmp_path / "out.mp4"
    code = main(["generate", "--model", "tiny", "--image", str(tmp_path / "in.png"), "--out", str(out),
                 "--num-frames", "5", "--steps", "1", "--seed", "3", "--fps", "8"])
    assert code == 0
    meta, frames = read_mp4(out)
    assert frames.shape == (5, 80, 48, 3) and meta["fps"] == 8


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--num-frames", "10", "numFrames"), ("--width", "50", "width"), ("--steps", "0", "steps"),
     ("--scale", "nan", "scale"), ("--flow-shift", "-1", "flowShift")],
)
def test_cli_refuses_bad_input_before_loading_the_model(tmp_path, monkeypatch, capsys, flag, value, message):
    import particalize.compose as compose
    from particalize.cli import main

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded for an invalid request")

    monkeypatch.setattr(compose, "make_generator", must_not_load)
    noise_image(40, 60).save(tmp_path / "in.png")
    code = main(["generate", "--model", "tiny", "--image", str(tmp_path / "in.png"), "--out",
                 str(tmp_path / "o.mp4"), flag, value])
    assert code == 2
    assert f"[{message}]" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()
