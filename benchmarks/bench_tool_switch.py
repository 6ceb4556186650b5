"""What a catalogue of tools costs a warm worker: the time to switch LoRA stacks between tasks against a task's time,
and the memory each loaded tool takes (issue 26).

    python -m benchmarks.bench_tool_switch [--repeats N] [--out benchmarks/results/tool-switch-tiny.json]

Measured on the tiny preset (CPU): three tools loaded as adapters of their own (a kohya LoRA, a diffusers one, and
an original-layout one with full differences, which a switch rewrites in place), the switch itself
(`LoraStack.use`: diffusers' set_adapters and the differences) on the tiny transformer and on one with the 14B's
40 blocks (the same number of wrapped layers as the 14B, narrow: set_adapters walks the layers in Python), and a
small task run with the tool of the task before it or with another one (interleaved). Computed: the bytes one
tool's LoRA takes on the 14B at several ranks (its pairs, bf16, on every block's attention, image-attention and FFN
Linear, from the real shapes on the meta device), checked against what PEFT holds for the tiny model's adapters.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import WanTransformer3DModel
from PIL import Image

from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.lora.stack import LoraStack, LoraStackOptions
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from pipeline.random_weights import WAN_I2V_14B_TRANSFORMER
from pipeline.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_pipeline
from pipeline.weight_files.transformer_file import empty_transformer
from tests.lora_files import make_diffs, make_weights, target_modules, write_lora

TOOLS = ("remade/Squish", "remade/Inflate")
RANKS = (16, 32, 64, 128)


def write_tools(folder: Path, transformer: torch.nn.Module, rank: int) -> dict[str, tuple[tuple[Path, float], ...]]:
    """The default tool's LoRA and two effect tools', in three published layouts (Inflate's with differences)."""
    default = write_lora(folder / "particalize.safetensors", make_weights(transformer, rank=rank, seed=1), "diffusers")
    squish = write_lora(folder / "squish.safetensors", make_weights(transformer, rank=rank, seed=2), "kohya")
    inflate = write_lora(folder / "inflate.safetensors", make_weights(transformer, rank=rank, seed=3),
                         "original_down_up_alpha", make_diffs(transformer))
    return {"": ((default, 1.0),), TOOLS[0]: ((squish, 0.9),), TOOLS[1]: ((inflate, 0.6),)}


def switch_seconds(stack: LoraStack, repeats: int) -> float:
    """Median seconds of one switch to another tool (never a no-op: the stack alternates)."""
    order = ["", *TOOLS]
    seconds = []
    for i in range(repeats * len(order)):
        tool = order[i % len(order)]
        started = time.perf_counter()
        stack.use(False, tool)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def adapter_bytes(transformer: torch.nn.Module, adapter: str) -> int:
    """What PEFT holds for one adapter: its lora_A and lora_B weights."""
    return sum(p.numel() * p.element_size() for name, p in transformer.named_parameters()
               if f".{adapter}." in name and (".lora_A." in name or ".lora_B." in name))


def lora_bytes_14b(rank: int, dtype_bytes: int = 2) -> int:
    """One tool's LoRA pairs on the 14B (tests/lora_files.target_modules: every block's self- and cross-attention
    q/k/v/o, the image attention's k_img/v_img and both FFN Linears): rank x (in + out) per layer."""
    model = empty_transformer(WAN_I2V_14B_TRANSFORMER)
    modules = dict(model.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) * dtype_bytes
               for n in target_modules(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=12, help="tasks of each kind (same tool, another tool)")
    parser.add_argument("--out", default="benchmarks/results/tool-switch-tiny.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    params = GenerationParams(width=48, height=48, numFrames=9, steps=4, seed=1, prompt="a cat is squished")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        probe = VideoGenerator(GeneratorOptions(get_preset("tiny"), folder)).pipe.transformer
        stacks = write_tools(folder, probe, rank=4)
        options = LoraStackOptions(loras=stacks[""], tools=tuple((t, stacks[t]) for t in TOOLS))
        gen = VideoGenerator(GeneratorOptions(get_preset("tiny"), folder, loras=options))
        switch_tiny = switch_seconds(gen.lora_stack, args.repeats)
        per_adapter_tiny = {info.tool or "codexq/Particalize": adapter_bytes(gen.pipe.transformer, info.name)
                            for info in gen.loras}
        expected_tiny = sum(4 * 4 * (gen.pipe.transformer.get_submodule(n).in_features
                                     + gen.pipe.transformer.get_submodule(n).out_features)
                            for n in target_modules(gen.pipe.transformer))  # rank 4, float32

        order = ["", *TOOLS]
        for tool in order:  # warm caches (prompt and image encodings) and each tool once
            gen.generate(params, image, tool=tool)
        # Interleaved, so that a busy machine slows both alike: a task with the tool of the task before it, then
        # one with another tool (the next in turn).
        same, switched = [], []
        current = order[-1]
        for _ in range(args.tasks):
            for tool, times in ((current, same), (order[(order.index(current) + 1) % len(order)], switched)):
                started = time.perf_counter()
                gen.generate(params, image, tool=tool)
                times.append(time.perf_counter() - started)
                current = tool

        # The 14B's number of blocks (40), narrow: what set_adapters' walk over the wrapped layers costs there.
        wide = build_tiny_pipeline()
        wide.transformer = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 40}).eval()
        (folder / "40").mkdir()
        stack40 = LoraStack(wide)
        for tool, files in write_tools(folder / "40", wide.transformer, rank=4).items():
            for path, strength in files:
                stack40.load(path, strength, tool=tool)
        switch_40 = switch_seconds(stack40, args.repeats)
        layers_40 = len(target_modules(wide.transformer))

    memory = {rank: lora_bytes_14b(rank) for rank in RANKS}
    task = statistics.median(same)
    result = {
        "model": "tiny", "device": str(gen.device), "repeats": args.repeats, "tasks": args.tasks,
        "task": {"size": "48x48", "frames": params.num_frames, "steps": params.steps},
        "switch_seconds_tiny": switch_tiny, "switch_seconds_40_blocks": switch_40,
        "wrapped_layers_40_blocks": layers_40,
        "task_seconds_same_tool": task, "task_seconds_switched_tool": statistics.median(switched),
        "adapter_bytes_tiny": per_adapter_tiny, "adapter_bytes_tiny_expected_rank4_fp32": expected_tiny,
        "lora_bytes_14b_bf16": {str(rank): n for rank, n in memory.items()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }
    print(f"tool switch: tiny preset on {gen.device}, 3 tools, {args.repeats} switches each, {args.tasks} tasks")
    print(f"{'what':<52} {'value':>12}")
    print(f"{'switch, tiny (2 blocks, 24 wrapped layers) (ms)':<52} {1000 * switch_tiny:>12.2f}")
    print(f"{f'switch, 40 blocks ({layers_40} wrapped layers) (ms)':<52} {1000 * switch_40:>12.2f}")
    print(f"{'task, same tool as the task before (s)':<52} {task:>12.3f}")
    print(f"{'task, another tool than the task before (s)':<52} {result['task_seconds_switched_tool']:>12.3f}")
    for tool, n in per_adapter_tiny.items():
        print(f"{f'adapter held, tiny, {tool} (bytes)':<52} {n:>12,}")
    for rank, n in memory.items():
        print(f"{f'one tool on the 14B, rank {rank}, bf16 (MiB)':<52} {n / 2**20:>12.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
