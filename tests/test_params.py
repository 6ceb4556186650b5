"""The hosted tool's inputs: defaults from the published page, strings accepted, clear errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from particalize.settings import Settings
from pipeline.errors import InvalidParameter
from pipeline.params import (
    DEFAULT_PROMPT,
    PIPELINE_MAX_SIDE,
    GenerationParams,
    Limits,
    check_work,
    limits_from_settings,
    parse_params,
    resolve_size,
    size_for_image,
)


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
    ("inputs", "message"),
    [
        ({"numFrames": 80}, "[numFrames] must be 4*n + 1 (for example 33, 49, 81), got 80."),
        ({"numFrames": "81.5"}, "[numFrames] must be a whole number, got '81.5'."),
        ({"numFrames": 1001}, "[numFrames] must be at most 161, got 1001."),
        ({"steps": 0}, "[steps] must be at least 1, got 0."),
        ({"steps": "0"}, "[steps] must be at least 1, got '0'."),
        ({"steps": 101}, "[steps] must be at most 100, got 101."),
        ({"scale": "abc"}, "[scale] must be a number, got 'abc'."),
        ({"scale": "inf"}, "[scale] must be a number (finite), got 'inf'."),
        ({"scale": -1}, "[scale] must be between 0 and 30, got -1."),
        ({"scale": "-1"}, "[scale] must be between 0 and 30, got '-1'."),
        ({"flowShift": 0}, "[flowShift] must be greater than 0 and at most 50, got 0."),
        ({"width": 500}, "[width] must be 0 (from the image) or a multiple of 16, got 500."),
        ({"height": 8}, "[height] must be 0 (from the image) or a multiple of 16, got 8."),
        ({"width": 4096}, "[width] must be at most 1920, got 4096."),
        ({"width": 1920, "height": 1920}, "[width] x height must be at most 921600 pixels, got 1920x1920."),
        ({"fps": 0}, "[fps] must be between 1 and 60, got 0."),
        ({"fps": "0"}, "[fps] must be between 1 and 60, got '0'."),
        ({"fps": True}, "[fps] must be a whole number, not a boolean, got true."),
        ({"seed": 2**40}, "[seed] must be -1 (random) or between 0 and 4294967295, got 1099511627776."),
        ({"seed": "-2"}, "[seed] must be -1 (random) or between 0 and 4294967295, got '-2'."),
        ({"prompt": ["a", "b"]}, "[prompt] must be text, got [\"a\", \"b\"]."),
        ({"prompt": "x" * 5000}, "[prompt] must be at most 4000 characters long, got a text of 5000 characters."),
        ({"prompt": "nul\x00byte"}, "[prompt] must be text without NUL characters, got 'nul\\x00byte'."),
    ],
)
def test_bad_inputs_name_the_field_what_is_allowed_and_the_value_as_sent(inputs, message):
    with pytest.raises(InvalidParameter) as info:
        parse_params(inputs, Limits())
    assert info.value.name == message[1:].split("]")[0]
    assert str(info.value) == f"Request parameter {message}"


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


def test_work_over_the_cap_is_refused_with_the_product_the_limit_and_what_to_lower():
    limits = Limits(max_work=81 * 832 * 480 * 30)
    with pytest.raises(InvalidParameter) as info:
        parse_params({"numFrames": 81, "width": 832, "height": 480, "steps": 31}, limits)
    message = str(info.value)
    assert info.value.name == "numFrames"
    assert f"81 x 832 x 480 x 31 = {81 * 832 * 480 * 31}" in message
    assert f"limit of {81 * 832 * 480 * 30}" in message
    assert "lower numFrames, steps or width/height" in message


def test_work_at_the_cap_is_accepted():
    limits = Limits(max_work=81 * 832 * 480 * 30)
    params = parse_params({"numFrames": 81, "width": 832, "height": 480, "steps": 30}, limits)
    assert params.steps == 30


def test_default_cap_allows_the_hosted_defaults_at_720p_but_not_every_maximum_at_once():
    assert parse_params({"width": 1280, "height": 720, "steps": 50}, Limits()).num_frames == 81
    with pytest.raises(InvalidParameter, match="more than the limit"):
        parse_params({"width": 1280, "height": 720, "numFrames": 161, "steps": 100}, Limits())


@pytest.mark.parametrize("size", [{}, {"width": 1280}, {"height": 720}])
def test_a_size_from_the_image_is_checked_once_known(size):
    limits = Limits(max_work=9 * 32 * 32 * 2)
    params = parse_params({"numFrames": 161, "steps": 100, **size}, limits)  # size 0: unknown, not refused yet
    resolved = params.model_copy(update={"width": 1280, "height": 720})
    with pytest.raises(InvalidParameter) as info:
        check_work(resolved, limits, derived=True)
    assert "derived from the input image" in str(info.value)
    check_work(resolved.model_copy(update={"num_frames": 9, "steps": 2, "width": 32, "height": 32}), limits)


def test_limits_from_settings_carry_every_operator_limit():
    settings = Settings(max_num_frames=49, max_steps=40, max_side=1024, max_pixels=512 * 512, max_work=12345)
    assert limits_from_settings(settings) == Limits(
        max_num_frames=49, max_steps=40, max_side=1024, max_pixels=512 * 512, max_work=12345
    )


def test_limits_carry_the_models_pixel_budget():
    assert limits_from_settings(Settings(model="tiny")).max_area == 48 * 80
    assert limits_from_settings(Settings(model="wan2.1-i2v-14b-720p")).max_area == 720 * 1280
    assert limits_from_settings(Settings(model="tiny", model_max_area=4096)).max_area == 4096


def sized(image_size: tuple[int, int], limits: Limits | None = None, **inputs) -> GenerationParams:
    limits = limits or Limits()
    return size_for_image(parse_params(inputs, limits), image_size, limits)


def refusal(image_size: tuple[int, int], limits: Limits | None = None, **inputs) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as info:
        sized(image_size, limits, **inputs)
    return info.value


def test_a_size_sent_whole_is_kept_and_zero_takes_the_images_shape_within_the_models_budget():
    assert (sized((100, 2000), width=32, height=48).width, sized((100, 2000), width=32, height=48).height) == (32, 48)
    auto = sized((1920, 1080), Limits(max_area=480 * 832))
    assert auto.width * auto.height <= 480 * 832 and abs(auto.width / auto.height - 16 / 9) < 0.05


@pytest.mark.parametrize("image_size", [(100, 2000), (2, 2000), (2000, 2), (5000, 40)])
def test_width_and_height_zero_fit_any_image_within_the_side_and_pixel_limits(image_size):
    limits = Limits(max_side=1024, max_pixels=200_000, max_area=480 * 832)
    params = sized(image_size, limits)
    assert params.width % 16 == 0 and params.height % 16 == 0
    assert max(params.width, params.height) <= 1024 and params.width * params.height <= 200_000


def test_one_side_given_the_other_is_refused_not_shrunk_when_over_the_side_limit():
    error = refusal((100, 2000), width=1920)
    assert error.name == "height"
    assert str(error) == ("Request parameter [height] must be at most 1920, got 38400 (derived from the 100x2000 input "
                          "image and width 1920); send a smaller width, or both width and height, or use an image "
                          "closer to the video's shape.")
    assert refusal((2000, 100), height=1920).name == "width"


def test_a_derived_size_over_the_pixel_limit_is_refused_naming_it():
    error = refusal((1000, 1000), Limits(max_pixels=1024 * 1024), width=1920)
    assert str(error) == ("Request parameter [width] x height must be at most 1048576 pixels, got 1920x1920 (derived "
                          "from the 1000x1000 input image and width 1920); send a smaller width, or both width and "
                          "height (multiples of 16).")


def test_an_image_too_thin_for_the_pixel_limit_says_to_crop_it_or_send_the_size():
    error = refusal((2, 2000), Limits(max_side=1920, max_pixels=4096, max_area=4096))
    assert str(error).startswith("Request parameter [width] x height must be at most 4096 pixels, got 16x")
    assert "(derived from the 2x2000 input image); the image is too thin for this server: crop it, or send " \
           "width and height (multiples of 16)." in str(error)


def test_no_side_beyond_what_the_model_takes_even_when_the_operator_allows_more():
    roomy = Limits(max_side=100_000, max_pixels=10**9, max_work=10**15)
    error = refusal((2, 2000), roomy, width=32)
    assert str(error).startswith(f"Request parameter [height] must be at most {PIPELINE_MAX_SIDE} (the longest side "
                                 "the model can take), got 32000")
    with pytest.raises(InvalidParameter, match=rf"\[height\] must be at most {PIPELINE_MAX_SIDE}, got 16400"):
        parse_params({"width": 16, "height": 16400}, roomy)
    assert sized((1, 1000), Limits(max_side=100_000, max_pixels=10**9, max_area=10**9)).height <= PIPELINE_MAX_SIDE


def test_a_derived_size_over_the_work_cap_is_refused_saying_it_came_from_the_image():
    error = refusal((40, 40), Limits(max_work=9 * 32 * 32 * 2), numFrames=9, steps=2, width=48)
    assert error.name == "numFrames" and "derived from the input image" in str(error)
