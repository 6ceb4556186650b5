"""What LoRAs cost: loading (with every key accounted for), switching fast mode per request, and a fast-mode video
against a normal one (transformer forwards counted).

    python -m benchmarks.bench_lora [--model tiny|wan2.1-i2v-14b-480p|DIR] [--rank N] [--repeats N]
        [--out benchmarks/results/lora-<model>.json]

Two LoRA files are made for the loaded transformer in the published layouts (tests/lora_files.py): a style LoRA
(kohya `lora_unet_`, every block's attention and FFN) and a lightx2v-style step-distill LoRA (original names,
lora_down/up + alpha, and every difference kind: diff_b on each Linear, diff on the norms, diff_m on every
modulation table, img_emb, patch embedding). Their values are random: what is measured does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.timing import timed
from pipeline.generator import GeneratorOptions, VideoGenerator
from pipeline.params import GenerationParams
from pipeline.presets import get_preset
from tests.lora_files import make_diffs, make_weights, write_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--weights-dir", default=str(Path.home() / ".cache/particalize/weights"))
    parser.add_argument("--rank", type=int, default=None, help="rank of both LoRAs (default 4 tiny, 64 otherwise)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tiny = args.model == "tiny"
    rank, repeats = args.rank or (4 if tiny else 64), args.repeats or (5 if tiny else 1)
    params = GenerationParams(width=32 if tiny else 832, height=32 if tiny else 480, numFrames=9 if tiny else 81,
                              seed=42, prompt="a dog is crystallizing into translucent shards")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (params.height, params.width, 3), np.uint8))

    gen = VideoGenerator(GeneratorOptions(get_preset(args.model), Path(args.weights_dir)))
    transformer = gen.pipe.transformer
    forwards: list[int] = [0]
    transformer.register_forward_pre_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    with tempfile.TemporaryDirectory() as tmp:
        style = write_lora(Path(tmp) / "style.safetensors", make_weights(transformer, rank=rank, magnitude=0.01),
                           "kohya")
        distill = write_lora(Path(tmp) / "distill.safetensors",
                             make_weights(transformer, rank=rank, seed=9, magnitude=0.01), "original_down_up_alpha",
                             make_diffs(transformer, magnitude=0.001))
        sizes = {"style_mb": style.stat().st_size / 2**20, "distill_mb": distill.stat().st_size / 2**20}
        load_style = timed(lambda: gen.lora_stack.load(style, 1.0), gen.device)[0]
        load_distill = timed(lambda: gen.lora_stack.load(distill, 1.0, speed=True), gen.device)[0]
    switches = [timed(lambda fast=fast: gen.lora_stack.use(fast), gen.device)[0]
                for _ in range(repeats) for fast in (True, False)]

    runs: dict[str, dict] = {}
    for mode in ("normal", "fast"):
        request = params.model_copy(update={"mode": mode})
        gen.generate(request, image)  # warm-up
        forwards[0] = 0
        seconds = [timed(lambda request=request: gen.generate(request, image), gen.device)[0] for _ in range(repeats)]
        runs[mode] = {"seconds": statistics.median(seconds), "forwards": forwards[0] // repeats,
                      "steps": gen.resolve(request, image).steps}
    result = {
        "model": args.model, "device": str(gen.device), "rank": rank, "repeats": repeats, **sizes,
        "loras": [info.describe() for info in gen.loras],
        "load_style_seconds": load_style, "load_distill_seconds": load_distill,
        "switch_mode_seconds_median": statistics.median(switches),
        "video": {"size": f"{params.width}x{params.height}", "frames": params.num_frames, **runs},
        "speedup_fast": runs["normal"]["seconds"] / runs["fast"]["seconds"],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }
    print(f"LoRA benchmark: {args.model} on {gen.device}, rank {rank}, {repeats} repeat(s)")
    for info in result["loras"]:
        print(f"  {info}")
    print(f"{'what':<34} {'value':>12}")
    print(f"{'load style LoRA (s)':<34} {load_style:>12.3f}")
    print(f"{'load distill LoRA, all kinds (s)':<34} {load_distill:>12.3f}")
    print(f"{'switch mode, per request (s)':<34} {result['switch_mode_seconds_median']:>12.4f}")
    for mode, run in runs.items():
        label = f"{mode} video: {run['steps']} steps, {run['forwards']} fwd (s)"
        print(f"{label:<34} {run['seconds']:>12.3f}")
    print(f"{'fast speed-up':<34} {result['speedup_fast']:>11.1f}x")
    out = Path(args.out or f"benchmarks/results/lora-{args.model.replace('/', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
