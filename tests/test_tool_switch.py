"""Switching tools per run on one warm generator: each tool's LoRAs loaded once, a run with exactly its tool's LoRAs
at their strengths, frames bit-equal to a fresh generator loaded with only that tool's LoRAs, after any number of
other tools' runs (no drift)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import LoraFuseRefused, LoraMismatch
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.lora.stack import LoraStackOptions
from pipeline.presets import get_preset
from tests.images import noise_image
from tests.lora_files import make_diffs, make_weights, write_lora
from tests.test_lora import PARAMS

IMAGE = noise_image(32, 32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory):
    """The default tool's LoRA and two effect tools' LoRAs, in different published layouts (one with full
    differences, so that switching rewrites weights in place too)."""
    tmp = tmp_path_factory.mktemp("tool-loras")
    transformer = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp)).pipe.transformer
    default = write_lora(tmp / "particalize.safetensors", make_weights(transformer, seed=11), "diffusers")
    squish = write_lora(tmp / "squish.safetensors", make_weights(transformer, rank=2, alpha=1.0, seed=12), "kohya")
    inflate = write_lora(tmp / "inflate.safetensors", make_weights(transformer, seed=13, magnitude=0.2),
                         "original_down_up_alpha", make_diffs(transformer, seed=14))
    return tmp, {"": ((default, 1.0),), "remade/Squish": ((squish, 0.9),), "remade/Inflate": ((inflate, 0.6),)}


def generator(tmp, stacks: dict, tools: tuple[str, ...] = ()) -> VideoGenerator:
    options = LoraStackOptions(loras=stacks.get("", ()),
                               tools=tuple((tool, stacks[tool]) for tool in tools))
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, loras=options))


@pytest.fixture(scope="module")
def fresh_frames(files) -> dict[str, np.ndarray]:
    """Each tool's frames from a generator that loaded only that tool's LoRAs (as its default stack)."""
    tmp, stacks = files
    return {tool: generator(tmp, {"": stack}).generate(PARAMS, IMAGE).frames for tool, stack in stacks.items()}


@pytest.fixture(scope="module")
def warm(files) -> VideoGenerator:
    tmp, stacks = files
    return generator(tmp, stacks, ("remade/Squish", "remade/Inflate"))


def test_each_tools_loras_are_loaded_once_under_their_own_adapters(warm: VideoGenerator):
    assert [(info.tool, info.strength) for info in warm.loras] == [
        ("", 1.0), ("remade/Squish", 0.9), ("remade/Inflate", 0.6)]
    assert len({info.name for info in warm.loras}) == 3


def test_tools_differ(fresh_frames: dict[str, np.ndarray]):
    frames = list(fresh_frames.values())
    assert all(np.abs(a - b).max() > 1e-3 for i, a in enumerate(frames) for b in frames[i + 1:])


def test_alternating_tools_give_bit_equal_frames_with_no_drift(warm: VideoGenerator,
                                                               fresh_frames: dict[str, np.ndarray]):
    """50 tasks over the three tools in a changing order: each equals, bit for bit, a fresh generator's."""
    order = ["remade/Squish", "", "remade/Inflate", "remade/Squish", "remade/Inflate", ""]
    for index in range(50):
        tool = order[index % len(order)]
        frames = warm.generate(PARAMS, IMAGE, tool=tool).frames
        assert np.array_equal(frames, fresh_frames[tool]), (index, tool)


def test_a_tool_not_loaded_is_refused_by_name(warm: VideoGenerator):
    with pytest.raises(LoraMismatch, match="remade/Explode"):
        warm.generate(PARAMS, IMAGE, tool="remade/Explode")


def test_fusing_is_refused_with_tools(files):
    tmp, stacks = files
    options = LoraStackOptions(loras=stacks[""], tools=(("remade/Squish", stacks["remade/Squish"]),), fuse=True)
    with pytest.raises(LoraFuseRefused, match="tool catalogue"):
        VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, loras=options))


# --- through the server: a catalogue of two tools, one warm worker ------------------------------------------------

def test_a_worker_runs_each_task_with_its_tools_loras(files, tmp_path):
    """Tasks of both tools and the default one on one warm worker (built from the catalogue by the composition):
    tool B's video after tool A's equals, frame for frame and byte for byte, a fresh `generate` with B's LoRA."""
    from fastapi.testclient import TestClient

    from particalize.cli import main
    from particalize.compose import generator_options
    from particalize.compose_server import build_app
    from particalize.core_options import worker_options
    from pipeline.video import read_mp4
    from server.worker import Worker
    from tests.conftest import make_settings
    from tests.images import png_bytes

    folder, stacks = files
    (squish, squish_strength), = stacks["remade/Squish"]
    (inflate, inflate_strength), = stacks["remade/Inflate"]
    catalogue = tmp_path / "tools.toml"
    catalogue.write_text(f'[[tools]]\nslug = "remade/Squish"\nloras = ["{squish}:{squish_strength}"]\n'
                         f'[[tools]]\nslug = "remade/Inflate"\nloras = ["{inflate}:{inflate_strength}"]\n')
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", tools_file=catalogue,
                             lora_path=stacks[""][0][0])
    image = png_bytes(32, 32)
    (tmp_path / "start.png").write_bytes(image)
    inputs = {"prompt": "a glass dog shatters", "numFrames": "5", "steps": "2", "seed": "11", "width": "32",
              "height": "32", "fps": "8"}
    generator = VideoGenerator(generator_options(settings))
    with TestClient(build_app(settings)) as client:
        services = client.app.state.services
        worker = Worker(services.store, services.storage, generator, worker_options(settings),
                        worker_id="testnode/gpu0")
        outputs = {}
        for slug in ["remade/Inflate", "remade/Squish", "codexq/Particalize", "remade/Squish"]:
            run = client.post(f"/v1/Run/{slug}", data=inputs, files={"inputImage": ("start.png", image)}).json()
            assert run["result"] is True, run
            assert worker.run_once()
            task = client.post("/v1/Task/Detail", json={"taskid": run["taskid"]}).json()["tasklist"][0]
            assert task["pexit"] == "0", task["debugerror"]
            outputs.setdefault(slug, []).append(settings.outputs_dir / services.storage.output_relpath(
                services.store.reads.get(int(run["taskid"])).uuid, task["outputs"][0]["name"]))
    fresh = tmp_path / "fresh-squish.mp4"
    assert main(["generate", "--model", "tiny", "--image", str(tmp_path / "start.png"), "--out", str(fresh),
                 "--lora", f"{squish}:{squish_strength}", "--prompt", "a glass dog shatters", "--num-frames", "5",
                 "--steps", "2", "--seed", "11", "--width", "32", "--height", "32", "--fps", "8"]) == 0
    for path in outputs["remade/Squish"]:  # the first after Inflate's task, the second after the default tool's
        assert path.read_bytes() == fresh.read_bytes()
    assert not np.array_equal(read_mp4(outputs["remade/Inflate"][0])[1], read_mp4(fresh)[1])


# --- generate and batch with --tool -------------------------------------------------------------------------------

VIDEO = ["--model", "tiny", "--num-frames", "5", "--seed", "11", "--width", "32", "--height", "32", "--fps", "8"]


def test_generate_and_batch_take_a_tool_with_its_loras_defaults_and_trigger(files, tmp_path, capsys):
    import json

    from particalize.cli import main
    from tests.images import png_bytes

    _, stacks = files
    (squish, strength), = stacks["remade/Squish"]
    catalogue = tmp_path / "tools.toml"
    catalogue.write_text(f'[[tools]]\nslug = "remade/Squish"\nloras = ["{squish}:{strength}"]\ntrigger = "sq41sh"\n'
                         '[tools.defaults]\nsteps = 2\nprompt = "a glass dog shatters"\n')
    (tmp_path / "in.png").write_bytes(png_bytes(32, 32))
    image = ["--image", str(tmp_path / "in.png")]
    by_hand = tmp_path / "by-hand.mp4"
    assert main(["generate", *image, "--out", str(by_hand), *VIDEO, "--lora", f"{squish}:{strength}",
                 "--steps", "2", "--prompt", "sq41sh a glass dog shatters"]) == 0
    by_tool = tmp_path / "by-tool.mp4"
    assert main(["generate", *image, "--out", str(by_tool), *VIDEO, "--tools", str(catalogue),
                 "--tool", "remade/squish"]) == 0
    assert by_tool.read_bytes() == by_hand.read_bytes()

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "one", "image": "in.png"}) + "\n")
    out = tmp_path / "batch"
    assert main(["batch", str(rows), "--out", str(out), *VIDEO, "--tools", str(catalogue),
                 "--tool", "remade/Squish"]) == 0
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert record["parameters"]["prompt"] == "sq41sh a glass dog shatters"
    assert (out / "one.mp4").read_bytes() == by_hand.read_bytes()

    capsys.readouterr()
    assert main(["generate", *image, "--out", str(tmp_path / "x.mp4"), *VIDEO, "--tools", str(catalogue),
                 "--tool", "remade/Explode"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --tool remade/Explode: no such tool (the catalogue has codexq/Particalize, remade/Squish; set "
        "--tools FILE)"]


# --- under compile --------------------------------------------------------------------------------------------------

def test_switching_tools_under_compile_compiles_nothing_after_the_warm_up(files):
    """Each tool is compiled once, in the warm-up (its active adapters are guarded state); alternating tools then
    compiles nothing (dynamo's recompile error is on), and the compiled frames of each tool match the eager ones."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pipeline.params import GenerationParams
    from pipeline.speed.acceleration import GRAPHS_PER_STACK, SpeedOptions

    tmp, stacks = files
    tools = ("remade/Squish", "remade/Inflate")
    options = LoraStackOptions(loras=stacks[""], tools=tuple((tool, stacks[tool]) for tool in tools))
    small = GenerationParams(width=32, height=32, numFrames=5, steps=2, seed=3)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, speed=SpeedOptions(compile=True),
                                                   loras=options))
        assert compiled.applied.compiled and not any(info.fused for info in compiled.loras)
        assert torch._dynamo.config.recompile_limit >= 3 * GRAPHS_PER_STACK, "room for each tool's graphs"
        warmed = counters["stats"]["unique_graphs"]
        assert warmed >= 1
        torch._dynamo.config.error_on_recompile = True
        frames = {}
        for tool in ["remade/Squish", "", "remade/Inflate", "remade/Squish", "", "remade/Inflate"]:
            frames[tool] = compiled.generate(small, IMAGE, tool=tool).frames
        assert counters["stats"]["unique_graphs"] == warmed
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    eager = generator(tmp, stacks, tools)
    for tool, got in frames.items():
        np.testing.assert_allclose(got, eager.generate(small, IMAGE, tool=tool).frames, atol=2e-3)


def test_compile_keeps_room_for_every_tools_graphs():
    """Each tool (x each mode) compiles graphs of its own, and dynamo keeps 8 per function by default: past that a
    tool would run eagerly. The limit is raised to 8 per tool and mode (never lowered)."""
    import torch._dynamo.config as dynamo_config

    from pipeline.speed.acceleration import GRAPHS_PER_STACK, allow_graphs

    # dynamo's own patch (monkeypatch's undo would delete a config entry the test did not create)
    with dynamo_config.patch(recompile_limit=GRAPHS_PER_STACK, accumulated_recompile_limit=256):
        assert allow_graphs(1) == GRAPHS_PER_STACK
        assert allow_graphs(10 * 2) == 20 * GRAPHS_PER_STACK == dynamo_config.recompile_limit
        assert allow_graphs(3) == 20 * GRAPHS_PER_STACK, "never lowered"
        assert allow_graphs(40) == 320 == dynamo_config.accumulated_recompile_limit
    assert hasattr(dynamo_config, "recompile_limit") and hasattr(dynamo_config, "accumulated_recompile_limit")


@pytest.mark.parametrize("base", ["fp8_scaled", "gguf"])
def test_tools_switch_on_a_quantized_base_as_on_bf16(files, tmp_path, base):
    """A ComfyUI-style fp8-scaled or GGUF Q8_0 transformer file under the tools: each tool's frames after the other's
    equal a fresh generator's on the same file with only that tool's LoRAs (pairs as adapters on the quantized
    layers, full differences on the float layers they touch)."""
    from pipeline.weight_files.files import WeightFiles
    from tests.checkpoint_files import (
        gguf_quantized_keys,
        linear_weights,
        transformer_state,
        write_fp8_transformer,
        write_gguf,
    )

    tmp, stacks = files
    tiny = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp)).pipe.transformer
    state, linear = transformer_state(tiny), linear_weights(tiny)
    if base == "fp8_scaled":
        path = write_fp8_transformer(tmp_path / "fp8.safetensors", state, linear, scaled="scale_weight")[0]
    else:
        path = write_gguf(tmp_path / "q8.gguf", state, gguf_quantized_keys(state, linear, tiny._keep_in_fp32_modules))
    tools = ("remade/Squish", "remade/Inflate")

    def on_base(stack_of: dict, loaded: tuple[str, ...] = ()) -> VideoGenerator:
        options = LoraStackOptions(loras=stack_of.get("", ()), tools=tuple((t, stack_of[t]) for t in loaded))
        return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, loras=options,
                                               weight_files=WeightFiles(transformer=path)))

    fresh = {tool: on_base({"": stacks[tool]}).generate(PARAMS, IMAGE).frames for tool in tools}
    warm = on_base(stacks, tools)
    assert not np.array_equal(fresh[tools[0]], fresh[tools[1]])
    for tool in (*tools, *tools):
        np.testing.assert_array_equal(warm.generate(PARAMS, IMAGE, tool=tool).frames, fresh[tool])
