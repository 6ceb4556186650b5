"""The hosted tool's inputs: defaults from the published page, strings accepted, clear errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.errors import InvalidParameter
from pipeline.params import DEFAULT_PROMPT, GenerationParams, Limits, parse_params, resolve_size


def test_defaults_are_the_hosted_tools():
    p = parse_params({})
    assert (p.prompt, p.negative_prompt) == (DEFAULT_PROMPT, "bad quality video")
    assert (p.fps, p.width, p.height, p.num_frames, p.steps, p.scale, p.flow_shift) == (16, 0, 0, 81, 30, 5.0, 5.0)
    assert p.seed is None


def test_values_sent_as_strings_like_the_seed_are_accepted():
    p = parse_params({"scale": "5.0", "flowShift": "3.5", "numFrames": "49", "steps": "20", "fps": "24.0",
                      "width": "832", "height": "480", "seed": "10700418"})
    assert (p.scale, p.flow_shift, p.num_frames, p.steps, p.fps, p.seed) == (5.0, 3.5, 49, 20, 24, 10700418)


def test_empty_form_fields_mean_default_and_minus_one_seed_means_random():
    p = parse_params({"prompt": "", "width": "", "seed": "-1"})
    assert p.prompt == DEFAULT_PROMPT and p.width == 0 and p.seed is None
    assert p.with_seed().seed is not None


def test_wiro_names_round_trip():
    p = parse_params({"negativePrompt": "blurry", "numFrames": 33, "flowShift": 2})
    assert p.wiro_inputs()["negativePrompt"] == "blurry"
    assert p.wiro_inputs()["numFrames"] == 33 and p.wiro_inputs()["flowShift"] == 2.0


@pytest.mark.parametrize(
    ("inputs", "field", "fragment"),
    [
        ({"numFrames": 80}, "numFrames", "4*n + 1"),
        ({"numFrames": "81.5"}, "numFrames", "whole number"),
        ({"numFrames": 1001}, "numFrames", "at most 161"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"steps": 101}, "steps", "at most 100"),
        ({"scale": "abc"}, "scale", "must be a number"),
        ({"scale": "inf"}, "scale", "finite"),
        ({"scale": -1}, "scale", "greater than or equal to 0"),
        ({"flowShift": 0}, "flowShift", "greater than 0"),
        ({"width": 500}, "width", "multiple of 16"),
        ({"height": 8}, "height", "multiple of 16"),
        ({"width": 4096}, "width", "at most 1920"),
        ({"width": 1920, "height": 1920}, "width", "pixels"),
        ({"fps": 0}, "fps", "greater than or equal to 1"),
        ({"fps": True}, "fps", "not a boolean"),
        ({"seed": 2**40}, "seed", "less than or equal to"),
        ({"prompt": ["a", "b"]}, "prompt", "must be text"),
        ({"prompt": "x" * 5000}, "prompt", "at most 4000"),
        ({"prompt": "nul\x00byte"}, "prompt", "NUL"),
    ],
)
def test_bad_inputs_name_the_field_and_the_fix(inputs, field, fragment):
    with pytest.raises(InvalidParameter) as info:
        parse_params(inputs, Limits())
    assert info.value.name == field
    assert str(info.value).startswith(f"Request parameter [{field}]")
    assert fragment in str(info.value)


def test_resolve_size_keeps_the_budget_and_the_multiple():
    w, h = resolve_size((1920, 1080), 0, 0, 480 * 832, 16)
    assert w % 16 == 0 and h % 16 == 0
    assert w * h <= 480 * 832
    assert abs(w / h - 16 / 9) < 0.05
    assert resolve_size((1, 1000), 0, 0, 480 * 832, 16)[0] == 16  # never below one multiple


def test_params_are_immutable():
    p = GenerationParams()
    with pytest.raises(ValidationError):
        p.steps = 3  # type: ignore[misc]
