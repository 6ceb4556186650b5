"""Out of memory during a task, injected on the tiny model at the prompt's encoding, in a transformer forward and in
the VAE decode: the task ends with a message naming the size asked and what to lower or switch on, memory is
released and the warm model serves the next task; a decode out of memory is retried once with VAE tiling. The
separated decode gives the frames the pipeline's own decode gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import OutOfMemory
from pipeline.out_of_memory import is_out_of_memory
from pipeline.params import GenerationParams
from tests.conftest import make_settings
from tests.images import noise_image
from tests.test_worker import SMALL, make_worker, queue_task

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.5 GiB"
ASKED = f"{SMALL['width']}x{SMALL['height']}, {SMALL['numFrames']} frames, {SMALL['steps']} steps"


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}")


def failing(original, times: int, error: BaseException | None = None, when=lambda: True):
    """`original`, raising an out-of-memory error on its first `times` calls (where `when()` holds)."""
    calls = {"raised": 0, "calls": 0}

    def wrapper(*args, **kwargs):
        calls["calls"] += 1
        if calls["raised"] < times and when():
            calls["raised"] += 1
            raise error or torch.OutOfMemoryError(CUDA_OOM)
        return original(*args, **kwargs)

    wrapper.calls = calls
    return wrapper


def test_out_of_memory_is_recognised_by_type_then_by_message():
    assert is_out_of_memory(torch.OutOfMemoryError("x")) and is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 85899345920 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))


def test_the_separated_decode_gives_the_pipelines_own_frames(tiny_generator):
    generator = tiny_generator
    image = noise_image(40, 40)
    params = generator.resolve(GenerationParams(numFrames=9, steps=2, width=32, height=32, seed=11), image)
    ours = generator.generate(params, image).frames
    embeds, negative = generator.embeddings.prompt_embeds(params.prompt, params.negative_prompt, True,
                                                          generator.max_sequence_length, generator.device)
    theirs = generator.pipe(image=image, prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=32,
                            num_frames=9, num_inference_steps=2, guidance_scale=params.scale,
                            generator=torch.Generator(device="cpu").manual_seed(11), output_type="np",
                            max_sequence_length=generator.max_sequence_length).frames[0]
    assert ours.shape == (9, 32, 32, 3)
    np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=np.float32))


@pytest.mark.parametrize("where", ["encode", "denoise"])
def test_out_of_memory_ends_the_task_with_the_size_and_the_next_task_runs(where, store, settings, tiny_generator,
                                                                          monkeypatch):
    generator = tiny_generator
    if where == "encode":
        target, name = generator.embeddings, "prompt_embeds"
    else:
        target, name = generator.pipe.transformer, "forward"  # one transformer forward of the first step
    fault = failing(getattr(target, name), times=1)
    monkeypatch.setattr(target, name, fault)
    worker = make_worker(store, settings, generator)
    task = queue_task(store, prompt=f"a prompt for {where}")
    worker.run_once()
    failed = store.reads.get(task.id)
    assert failed.status == "task_postprocess_end" and failed.pexit == "1"
    assert failed.debugerror.startswith("Out of RAM while"), failed.debugerror
    phase = "encoding the prompt" if where == "encode" else "denoising"
    assert f"while {phase} a {ASKED} video (OutOfMemoryError)" in failed.debugerror
    if where == "denoise":
        assert "smaller width/height or fewer frames (numFrames)" in failed.debugerror
    assert store.reads.outputs([task.id])[task.id] == []
    assert generator.interrupt_points.stop is None, "the run's interrupt check is disarmed"

    following = queue_task(store, prompt=f"a prompt for {where}")
    worker.run_once()
    assert store.reads.get(following.id).pexit == "0", store.reads.get(following.id).debugerror
    assert fault.calls["raised"] == 1


def test_a_decode_out_of_memory_is_retried_tiled_and_succeeds(store, settings, tiny_generator, monkeypatch):
    vae = tiny_generator.pipe.vae
    assert not vae.use_tiling
    tiled_calls = []
    decode = vae.decode

    def watched(*args, **kwargs):
        tiled_calls.append(vae.use_tiling)
        return decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", failing(watched, times=1, when=lambda: not vae.use_tiling))
    worker = make_worker(store, settings, tiny_generator)
    task = queue_task(store)
    worker.run_once()
    done = store.reads.get(task.id)
    assert done.pexit == "0", done.debugerror
    assert tiled_calls == [True], "one decode, the retry, tiled (the first raised before decoding)"
    assert vae.use_tiling is False, "tiling is put back as it was"
    assert "the VAE decode ran out of memory and was retried with VAE tiling" in done.debugoutput


def test_a_decode_out_of_memory_also_when_tiled_fails_the_task_with_the_message(store, settings, tiny_generator,
                                                                                monkeypatch):
    vae = tiny_generator.pipe.vae
    fault = failing(vae.decode, times=2, error=MemoryError())
    monkeypatch.setattr(vae, "decode", fault)
    worker = make_worker(store, settings, tiny_generator)
    task = queue_task(store)
    worker.run_once()
    failed = store.reads.get(task.id)
    assert failed.pexit == "1" and fault.calls["raised"] == 2, "tried once, then once tiled"
    assert f"while decoding with the VAE (also when retried with VAE tiling) a {ASKED} video (MemoryError)" \
        in failed.debugerror
    assert vae.use_tiling is False
    monkeypatch.undo()
    following = queue_task(store)
    worker.run_once()
    assert store.reads.get(following.id).pexit == "0"


def test_the_generator_raises_out_of_memory_with_the_phase(tiny_generator, monkeypatch):
    monkeypatch.setattr(tiny_generator.pipe.vae, "decode", failing(tiny_generator.pipe.vae.decode, times=2))
    with pytest.raises(OutOfMemory) as raised:
        tiny_generator.generate(GenerationParams(numFrames=5, steps=1, width=32, height=32, seed=1),
                                noise_image(32, 32))
    assert raised.value.phase.startswith("decoding") and raised.value.__context__ is None, \
        "raised outside the handler: the original error (and the run's tensors) are not kept"
