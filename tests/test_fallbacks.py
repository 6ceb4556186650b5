"""Speed options that fail fall back to their default path, and a missing interrupt hook is said, never silent.

Each option is made to fail on the CPU where its library call is (half way where the library can leave something
behind): the generator still loads, gives the plain frames, lists the fallback in `Applied.fallbacks` and in the
detail /ready shows. A warm-up that fails turns off compile, then the attention kernel, ... and warms again; an
error that is no speed option's still stops the load. A transformer whose block list is not an nn.ModuleList gets
no per-block interrupt: that is logged, shown in /ready, and Kill stops at the end of the step, saying so.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, ModelMixin, WanTransformer3DModel
from diffusers.hooks import HookRegistry
from diffusers.models.transformers.transformer_wan import WanAttention
from fastapi.testclient import TestClient

import pipeline.speed.acceleration as acceleration
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.interrupt import InterruptPoints
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.speed import fa4
from pipeline.speed.acceleration import SpeedOptions
from pipeline.speed.guidance import HOOK_NAME
from server.worker.entry import loaded_detail
from tests.images import noise_image

PARAMS = GenerationParams(width=48, height=32, numFrames=9, steps=3, seed=7, prompt="crystal shards")
IMAGE = noise_image(48, 32)


def make(tmp: Path, **speed) -> VideoGenerator:
    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp, speed=SpeedOptions(**speed)))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> np.ndarray:
    return make(tmp_path_factory.mktemp("w")).generate(PARAMS, IMAGE).frames


def after_calls(original, calls_before_failing: int, error: Exception):
    """`original`, failing (after doing its work) from its `calls_before_failing`+1-th call on: a half-done enable."""
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        result = original(*args, **kwargs)
        if count["n"] > calls_before_failing:
            raise error
        return result

    return wrapper


def hook_names(module: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            names.update(registry.hooks)
    return names


def assert_fell_back(gen: VideoGenerator, plain: np.ndarray, option: str, error: str) -> None:
    """Loaded, listed once with the error's type, shown in the registered detail, and the plain frames."""
    listed = [f for f in gen.applied.fallbacks if f.startswith(option)]
    assert len(listed) == 1 and error in listed[0], gen.applied.fallbacks
    detail, _ = loaded_detail(gen)
    assert "speed option fallbacks (default path used): " + listed[0] in detail, detail
    np.testing.assert_array_equal(gen.generate(PARAMS, IMAGE).frames, plain)


# ------------------------------------------- while enabling -------------------------------------------

@pytest.fixture
def installed_fa4(monkeypatch):
    """FlashAttention-4 present, supported and exact here (as on an H200), so that `enable` is reached."""
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName

    monkeypatch.setattr(fa4, "local_kernel", lambda: (lambda q, k, v, **kw: (torch.zeros_like(q), None)))
    monkeypatch.setattr(fa4, "unsupported_reason", lambda device, dtype: None)
    monkeypatch.setattr(fa4, "max_abs_error", lambda device, dtype: 0.0)
    entry = _HUB_KERNELS_REGISTRY[AttentionBackendName.FLASH_4_HUB]
    before = entry.kernel_fn
    yield
    entry.kernel_fn = before


def test_fa4_enable_failing_on_a_renamed_registry_falls_back_to_sdpa(tmp_path, plain, installed_fa4, monkeypatch):
    import diffusers.models.attention_dispatch as dispatch

    monkeypatch.setattr(dispatch, "_HUB_KERNELS_REGISTRY", {})  # a release that renamed or rekeyed it: KeyError
    gen = make(tmp_path, attention_backend=fa4.NAME)
    assert gen.applied.attention_backend == "native" and gen.applied.attention_max_abs_error is None
    assert_fell_back(gen, plain, "attention backend 'flash_4'", "KeyError")


def test_fa4_enable_failing_half_way_leaves_no_processor_on_it(tmp_path, plain, installed_fa4, monkeypatch):
    monkeypatch.setattr(fa4, "enable", after_calls(fa4.enable, 0, AttributeError("processor has no attribute")))
    gen = make(tmp_path, attention_backend=fa4.NAME)
    backends = {getattr(m.processor, "_attention_backend", None) for m in gen.pipe.transformer.modules()
                if isinstance(m, WanAttention)}
    assert backends == {None}  # diffusers' default: SDPA
    assert_fell_back(gen, plain, "attention backend 'flash_4'", "AttributeError: processor has no attribute")


def test_set_attention_backend_failing_falls_back_to_sdpa(tmp_path, plain, monkeypatch):
    def broken(self, backend):
        raise AttributeError("'AttentionBackendName' has no attribute 'NATIVE'")

    monkeypatch.setattr(ModelMixin, "set_attention_backend", broken)
    gen = make(tmp_path)
    assert gen.applied.attention_backend == "native"
    assert_fell_back(gen, plain, "attention backend 'auto'", "AttributeError")


def test_fused_qkv_failing_half_way_is_unfused(tmp_path, plain, monkeypatch):
    monkeypatch.setattr(WanAttention, "fuse_projections",
                        after_calls(WanAttention.fuse_projections, 1, RuntimeError("cannot concatenate")))
    gen = make(tmp_path, fuse_qkv=True)
    attentions = [m for m in gen.pipe.transformer.modules() if isinstance(m, WanAttention)]
    assert not any(hasattr(m, n) for m in attentions for n in ("to_qkv", "to_kv", "to_added_kv"))
    assert not any(m.fused_projections for m in attentions) and not gen.applied.fused_qkv
    assert_fell_back(gen, plain, "fused QKV", "RuntimeError: cannot concatenate")


class FakeTorchao:
    """`torchao.quantization` whose quantize_ swaps weights (for new ones, doubled: frames show a layer left
    "quantized") and fails on demand."""

    def __init__(self, fail_after_layers: int | None = None, probe_fails: bool = False) -> None:
        self.fail_after_layers, self.probe_fails = fail_after_layers, probe_fails
        self.quantized: list[str] = []
        self.module = types.ModuleType("torchao.quantization")
        self.module.Float8DynamicActivationFloat8WeightConfig = lambda: "float8-config"
        self.module.quantize_ = self.quantize_

    def quantize_(self, model: torch.nn.Module, config: object, filter_fn=None) -> None:
        if isinstance(model, torch.nn.Linear):  # the copy of one layer, checked first
            if self.probe_fails:
                raise NotImplementedError("float8 matmul is not supported on this device")
            return
        for fqn, module in model.named_modules():
            if filter_fn(module, fqn):
                if self.fail_after_layers is not None and len(self.quantized) >= self.fail_after_layers:
                    raise RuntimeError(f"cannot quantize {fqn}")
                module.weight = torch.nn.Parameter(module.weight.detach() * 2, requires_grad=False)
                module.extra_repr = lambda: "quantized"
                self.quantized.append(fqn)


@pytest.fixture
def fake_torchao(monkeypatch):
    def install(**kwargs) -> FakeTorchao:
        fake = FakeTorchao(**kwargs)
        monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
        monkeypatch.setitem(sys.modules, "torchao.quantization", fake.module)
        monkeypatch.setattr(acceleration, "float8_unsupported", lambda device: None)  # as on an H100
        # every Linear of the tiny model (its sizes are mostly not multiples of 16): many layers to walk
        monkeypatch.setattr(acceleration, "float8_filter",
                            lambda module, fqn, keep=(): isinstance(module, torch.nn.Linear) and "to_k" not in fqn)
        return fake

    return install


def test_float8_failing_half_way_puts_every_layer_back(tmp_path, plain, fake_torchao):
    fake = fake_torchao(fail_after_layers=3)
    gen = make(tmp_path, float8=True)
    assert len(fake.quantized) == 3 and not gen.applied.float8  # three layers had been swapped: put back
    assert not any("extra_repr" in m.__dict__ for m in gen.pipe.transformer.modules())
    assert_fell_back(gen, plain, "float8", "RuntimeError: cannot quantize")


def test_float8_not_running_here_is_found_on_a_copy_before_the_model_is_touched(tmp_path, plain, fake_torchao):
    fake = fake_torchao(probe_fails=True)
    gen = make(tmp_path, float8=True)
    assert fake.quantized == [] and not gen.applied.float8
    assert_fell_back(gen, plain, "float8", "NotImplementedError: float8 matmul is not supported")


def test_float8_that_works_is_applied_and_its_layers_stay_swapped(tmp_path, plain, fake_torchao):
    fake = fake_torchao()
    gen = make(tmp_path, float8=True)  # the warm-up (a check run, float8 on) works
    assert gen.applied.float8 and len(fake.quantized) > 3 and gen.applied.fallbacks == []
    assert not np.array_equal(gen.generate(PARAMS, IMAGE).frames, plain)  # the fake's doubled weights are in use


def test_step_cache_failing_half_way_leaves_no_hook(tmp_path, plain, monkeypatch):
    import diffusers.hooks

    monkeypatch.setattr(diffusers.hooks, "apply_first_block_cache",
                        after_calls(diffusers.hooks.apply_first_block_cache, 0, TypeError("unexpected keyword")))
    gen = make(tmp_path, step_cache="first_block")
    assert not any("fbc" in name for name in hook_names(gen.pipe.transformer)), hook_names(gen.pipe.transformer)
    assert not gen.pipe.transformer.is_cache_enabled and gen.applied.step_cache == "none"
    assert_fell_back(gen, plain, "step cache first_block", "TypeError: unexpected keyword")


def test_batched_guidance_failing_after_registering_its_hook_removes_it(tmp_path, plain, monkeypatch):
    monkeypatch.setattr(acceleration, "enable_batched_guidance",
                        after_calls(acceleration.enable_batched_guidance, 0, RuntimeError("hook registry changed")))
    gen = make(tmp_path, cfg_batch=True)
    assert HOOK_NAME not in hook_names(gen.pipe.transformer) and gen.applied.guidance_hook is None
    assert_fell_back(gen, plain, "batched guidance", "RuntimeError: hook registry changed")


def test_group_offload_failing_half_way_places_everything_on_the_device(tmp_path, plain, monkeypatch):
    import diffusers.hooks

    # the transformer is offloaded (diffusers' enable_group_offload), then the text encoder's fails
    monkeypatch.setattr(diffusers.hooks, "apply_group_offloading",
                        after_calls(diffusers.hooks.apply_group_offloading, 1, ValueError("unsupported layer")))
    gen = make(tmp_path, memory_mode="group_offload")
    for name in ("transformer", "text_encoder"):
        assert not any("offload" in n for n in hook_names(getattr(gen.pipe, name)))
    assert gen.applied.memory_mode == "none"
    assert_fell_back(gen, plain, "memory mode group_offload", "ValueError: unsupported layer")


def test_text_encoder_placement_failing_keeps_it_on_the_device(tmp_path, plain, monkeypatch):
    def broken(pipe, device, applied):
        raise RuntimeError("cannot move")

    monkeypatch.setattr(acceleration, "apply_text_encoder_on_cpu", broken)
    gen = make(tmp_path, text_encoder_on_cpu=True)
    assert not gen.applied.text_encoder_on_cpu
    assert_fell_back(gen, plain, "text encoder on the CPU", "RuntimeError: cannot move")


def test_vae_tiling_failing_half_way_is_off(tmp_path, plain, monkeypatch):
    def half(self, *args, **kwargs):
        self.use_tiling = True
        raise AttributeError("no tile_sample_min_num_frames")

    monkeypatch.setattr(AutoencoderKLWan, "enable_tiling", half)
    gen = make(tmp_path, vae_tiling=True)
    assert gen.pipe.vae.use_tiling is False and not gen.applied.vae_tiling
    assert_fell_back(gen, plain, "VAE tiling", "AttributeError: no tile_sample_min_num_frames")


def test_compile_failing_half_way_leaves_every_block_eager(tmp_path, plain, monkeypatch):
    def half(self, *args, **kwargs):
        self.blocks[0].compile(backend="eager")
        raise RuntimeError("regional compilation failed")

    monkeypatch.setattr(WanTransformer3DModel, "compile_repeated_blocks", half)
    gen = make(tmp_path, compile=True)
    assert not any(m._compiled_call_impl is not None for m in gen.pipe.transformer.modules())
    assert not gen.applied.compiled
    assert_fell_back(gen, plain, "compile", "RuntimeError: regional compilation failed")


def test_an_undo_that_fails_too_stops_the_load(tmp_path, monkeypatch):
    monkeypatch.setattr(WanAttention, "fuse_projections", after_calls(WanAttention.fuse_projections, 0,
                                                                      RuntimeError("half fused")))
    monkeypatch.setattr(WanAttention, "unfuse_projections", lambda self: (_ for _ in ()).throw(KeyError("to_qkv")))
    with pytest.raises(acceleration.SpeedOptionBroken, match="fused QKV failed .*half fused.* could not be undone"):
        make(tmp_path, fuse_qkv=True)


# ------------------------------------------- in the warm-up -------------------------------------------

def _failing_backend(graph, example_inputs):
    raise RuntimeError("inductor: no kernel for this GPU")


@pytest.fixture
def failing_compile(monkeypatch):
    """Blocks compiled with a backend that raises at their first call (as inductor failing on a new GPU)."""
    import torch._dynamo

    def compile_blocks(self, *args, **kwargs):
        for block in self.blocks:
            block.compile(backend=_failing_backend, fullgraph=True)

    monkeypatch.setattr(WanTransformer3DModel, "compile_repeated_blocks", compile_blocks)
    yield
    torch._dynamo.reset()


def test_a_compile_error_in_the_warm_up_turns_compile_off_and_the_first_task_works(tmp_path, plain, failing_compile):
    gen = make(tmp_path, compile=True)
    assert not gen.applied.compiled
    assert gen.applied.fallbacks == [gen.applied.fallbacks[0]] and "in the warm-up" in gen.applied.fallbacks[0]
    assert_fell_back(gen, plain, "compile (in the warm-up)", "inductor: no kernel for this GPU")


def test_an_attention_kernel_failing_at_its_first_call_falls_back_to_sdpa(tmp_path, plain, installed_fa4, monkeypatch):
    def kernel(q, k, v, softmax_scale=None, causal=False):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(fa4, "compilable_kernel", kernel)
    gen = make(tmp_path, attention_backend=fa4.NAME)  # not compiled: the warm-up runs to check the kernel
    assert gen.applied.attention_backend == "native"
    assert_fell_back(gen, plain, "attention (in the warm-up)", "no kernel image is available")


def test_compile_and_attention_failing_in_the_warm_up_are_both_turned_off(tmp_path, plain, installed_fa4,
                                                                          failing_compile, monkeypatch):
    def kernel(q, k, v, softmax_scale=None, causal=False):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(fa4, "compilable_kernel", kernel)
    gen = make(tmp_path, attention_backend=fa4.NAME, compile=True)
    assert not gen.applied.compiled and gen.applied.attention_backend == "native"
    assert [f.split(" (")[0] for f in gen.applied.fallbacks] == ["compile", "attention"]
    np.testing.assert_array_equal(gen.generate(PARAMS, IMAGE).frames, plain)


def test_an_error_that_is_no_speed_options_still_stops_the_load(tmp_path, monkeypatch, caplog):
    import torch._dynamo

    def compile_blocks(self, *args, **kwargs):
        for block in self.blocks:
            block.compile(backend="eager")

    def broken_decoder(self, *args, **kwargs):
        raise RuntimeError("the VAE decoder is broken")

    monkeypatch.setattr(WanTransformer3DModel, "compile_repeated_blocks", compile_blocks)
    monkeypatch.setattr(type(make(tmp_path).pipe.vae.decoder), "forward", broken_decoder)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="the VAE decoder is broken"):
            make(tmp_path, compile=True)
    finally:
        torch._dynamo.reset()
    assert "compile (in the warm-up): RuntimeError: the VAE decoder is broken" in caplog.text  # tried, then raised


# ------------------------------------------- the interrupt hooks -------------------------------------------

def test_interrupt_points_say_what_they_could_not_install():
    pipe = types.SimpleNamespace(transformer=torch.nn.Module(), vae=None)
    points = InterruptPoints(pipe)
    assert not points.blocks_hooked and not points.vae_hooked
    assert "transformer.blocks is missing" in points.problems[0] and "per-step interrupt" in points.problems[0]
    assert "vae.encoder and vae.decoder missing" in points.problems[1]

    pipe.transformer.blocks = torch.nn.Sequential(torch.nn.Identity())
    assert "a Sequential, not an nn.ModuleList" in InterruptPoints(pipe).problems[0]


def make_blockless(tmp: Path, **speed) -> VideoGenerator:
    """A tiny generator whose transformer walks its blocks from an nn.Sequential: no per-block hook is possible."""
    import pipeline.generator as generator_module

    real = generator_module.load_base_pipeline

    def load(*args, **kwargs):
        pipe = real(*args, **kwargs)
        pipe.transformer.blocks = torch.nn.Sequential(*pipe.transformer.blocks)
        return pipe

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generator_module, "load_base_pipeline", load)
        return make(tmp, **speed)


def _no_tiling(self, *args, **kwargs):
    raise AttributeError("no tile_sample_min_num_frames")


@pytest.fixture(scope="module")
def blockless(tmp_path_factory) -> VideoGenerator:
    """Also with a speed option that fell back (VAE tiling), so that /ready shows both parts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoencoderKLWan, "enable_tiling", _no_tiling)
        return make_blockless(tmp_path_factory.mktemp("w"), vae_tiling=True)


def test_a_generator_without_the_block_hook_says_so_and_still_runs(tmp_path, plain, caplog):
    with caplog.at_level(logging.WARNING):
        gen = make_blockless(tmp_path)
    assert not gen.interrupt_points.blocks_hooked and gen.interrupt_points.vae_hooked
    assert "interrupt: the per-block interrupt could not be installed" in caplog.text
    assert "interrupt: the per-block interrupt could not be installed" in loaded_detail(gen)[0]
    np.testing.assert_array_equal(gen.generate(PARAMS, IMAGE).frames, plain)


@pytest.fixture
def settings(tmp_path: Path):
    from tests.conftest import make_settings

    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", allow_private_urls=True)


@pytest.fixture
def blockless_worker(settings, blockless) -> Iterator[TestClient]:
    """The API and `run_worker` (registering its detail, as `particalize worker` does) on the blockless model."""
    from particalize.compose_server import build_app, open_storage
    from particalize.core_options import worker_options
    from server.worker import run_worker
    from tests.test_kill import wait_until

    with TestClient(build_app(settings)) as client:
        stop = threading.Event()
        thread = threading.Thread(target=run_worker, args=(worker_options(settings), open_storage(settings),
                                                           lambda: blockless, stop), daemon=True)
        thread.start()
        wait_until(lambda: client.get("/ready").status_code == 200, what="the worker to be ready")
        yield client
        stop.set()
        thread.join(30)


@pytest.fixture
def worker_log(caplog):
    caplog.set_level(logging.WARNING, logger="particalize.worker")
    return caplog


def test_ready_and_the_worker_start_lines_say_what_fell_back_and_that_the_block_hook_is_missing(worker_log,
                                                                                            blockless_worker):
    detail = blockless_worker.get("/ready").json()["loaded"][0]["detail"]
    assert "interrupt: the per-block interrupt could not be installed" in detail and "per-step interrupt" in detail
    assert "speed option fallbacks (default path used): VAE tiling (while enabling): AttributeError" in detail
    started = [r.getMessage() for r in worker_log.get_records("setup") if r.name == "particalize.worker"
               and r.levelno == logging.WARNING]
    assert any("interrupt: the per-block interrupt could not be installed" in m for m in started), started
    assert any("speed option fallbacks (default path used): VAE tiling" in m for m in started), started


def test_the_generate_cli_prints_the_fallbacks_above_its_progress(tmp_path, monkeypatch, capsys):
    from particalize.cli import main

    monkeypatch.setattr(AutoencoderKLWan, "enable_tiling", _no_tiling)
    monkeypatch.setenv("PARTICALIZE_VAE_TILING", "1")
    noise_image(40, 60).save(tmp_path / "in.png")
    code = main(["generate", "--model", "tiny", "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "o.mp4"),
                 "--num-frames", "5", "--steps", "1", "--seed", "3"])
    assert code == 0
    assert "warning: speed option fallbacks (default path used): VAE tiling (while enabling): AttributeError" \
        in capsys.readouterr().err


def test_kill_without_the_block_hook_stops_at_the_end_of_the_step_and_says_so(settings, blockless):
    from particalize.compose_server import build_app
    from particalize.core_options import worker_options
    from server.worker import Worker
    from tests.images import png_bytes
    from tests.test_kill import BLOCK_SECONDS, SlowModules, detail, run, wait_until

    slow = SlowModules(list(blockless.pipe.transformer.blocks), BLOCK_SECONDS)
    try:
        with TestClient(build_app(settings)) as client:
            services = client.app.state.services
            worker = Worker(services.store, services.storage, blockless, worker_options(settings),
                            worker_id="testnode/gpu0", fetch=lambda url, **kw: (png_bytes(40, 40), "image/png"))
            stop = threading.Event()
            thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
            thread.start()
            try:
                taskid = run(client, steps="50")
                wait_until(lambda: len(slow.started) >= 1, what="the first step to start")
                assert client.post("/v1/Task/Kill", json={"taskid": taskid}).json()["result"] is True
                wait_until(lambda: worker.current_task is None, timeout=30, what="the worker to drop the task")
                blocks = blockless.pipe.transformer.config.num_layers
                assert len(slow.started) <= 2 * 2 * blocks, "stopped within the step it was in (or the next)"
                ended = detail(client, taskid)
                assert ended["status"] == "task_cancel" and ended["outputs"] == []
                assert re.search(r"killed by request at the end of step [12] of 50 \(per-step interrupt: the "
                                 r"per-block hook could not be installed\)", ended["debugoutput"]), ended["debugoutput"]
                assert "before the first step" not in ended["debugoutput"]
            finally:
                stop.set()
                thread.join(30)
    finally:
        slow.remove()
