"""Is there memory for this configuration? Checked before anything is built, so that a model too big for the device
is refused in seconds with what would fit, instead of allocating until the kernel kills the process.

What a configuration needs: the bytes of each component's parameters in the dtype it is held in (computed on the
meta device by pipeline.weight_files.memory, the rules the loaders hold weights by), placed where the speed options
put them, plus the activations of one video at the preset's resolution (activation_bytes, from the model's own
shape). What the device has: free CUDA memory (torch.cuda.mem_get_info) on a GPU; available RAM (psutil, else
/proc/meminfo MemAvailable) for what is held in RAM (the CPU device, offloaded weights, a text encoder on the CPU).

Placement, as pipeline.loader and pipeline.speed.acceleration do it on CUDA: with no offload the loader places the whole
pipeline on the GPU first (float8 quantizes, and the text encoder moves to the CPU, afterwards), so the need is the
larger of that load and the run. model_cpu_offload holds one model at a time on the GPU, group_offload (leaf level)
keeps only the VAE and the image encoder there, sequential_cpu_offload about nothing but the activations; with any
offload the whole model sits in RAM. On the CPU everything is in RAM in float32; float8 and offload do not apply.
A loader's transient copies in RAM (a checkpoint read before it is placed) are not counted.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.devices import serving_dtype_for
from pipeline.errors import NotEnoughMemory
from pipeline.presets import ModelPreset
from pipeline.weight_files.files import WeightFiles
from pipeline.weight_files.memory import GIB, HEADROOM_480P_GIB, LABELS, TRANSFORMER_FORMATS

log = logging.getLogger(__name__)

AREA_480P = 480 * 832
DEFAULT_FRAMES = 81
"""The memory check sizes one video of the default numFrames at the preset's pixel budget."""
CPU_ACTIVATION_FACTOR = 2.0
"""Estimate, not measured: on the CPU the transformer's activations are float32, twice the bytes of CUDA's bf16."""
GROUP_OFFLOAD_STAGING_GIB = 1.0
"""Estimate: leaf-level group offload holds a leaf or two of the streamed models on the GPU besides the rest."""
OFFLOAD_MODES = ("model_cpu_offload", "group_offload", "sequential_cpu_offload")
FILE_HINT = "PARTICALIZE_TRANSFORMER_FILE or --transformer-file"


@dataclass(frozen=True)
class ModelShape:
    """What a model's activations grow with: its transformer's widths and the latent grid its VAE and patch make."""

    inner_dim: int
    ffn_dim: int
    patch: tuple[int, int, int]
    spatial_factor: int = 8
    temporal_factor: int = 4

    @classmethod
    def of(cls, transformer_config: dict[str, Any], vae_config: dict[str, Any] | None = None) -> ModelShape:
        patch = tuple(int(v) for v in transformer_config.get("patch_size", (1, 2, 2)))
        inner = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
        down = (vae_config or {}).get("temperal_downsample", [False, True, True])
        return cls(inner, int(transformer_config["ffn_dim"]), patch,  # type: ignore[arg-type]
                   spatial_factor=2 ** len(down), temporal_factor=2 ** sum(bool(d) for d in down))

    @property
    def token_width(self) -> int:
        """Values one video token holds at a block's widest point: the attention half keeps the residual, the
        normed input, q, k, v and the attention output (6 x inner); the feed-forward half the residual, its input
        and the FFN's hidden layer before and after the activation (2 x inner + 2 x ffn)."""
        return max(6 * self.inner_dim, 2 * self.inner_dim + 2 * self.ffn_dim)

    def tokens(self, area: int, frames: int = DEFAULT_FRAMES) -> int:
        latent_frames = (frames - 1) // self.temporal_factor + 1
        per_frame = area / (self.spatial_factor ** 2 * self.patch[1] * self.patch[2])
        return int(latent_frames / self.patch[0] * per_frame)


WAN_14B_SHAPE = ModelShape(40 * 128, 13824, (1, 2, 2))
"""Wan2.1 I2V 14B, whose 480P activations were measured (32,760 tokens for 81 frames at 480x832)."""
VIDEO_COPIES = 2
"""The decoded video in float32 as the VAE returns it, and the pipeline's postprocessed copy."""


def video_bytes(area: int, frames: int = DEFAULT_FRAMES) -> int:
    """The decoded float32 RGB video, times VIDEO_COPIES: exact arithmetic, whatever the model."""
    return VIDEO_COPIES * frames * 3 * area * 4


def activation_bytes(max_area: int, device_type: str, shape: ModelShape = WAN_14B_SHAPE) -> tuple[int, str]:
    """Headroom for one default video (81 frames) at a pixel budget, and how the figure was had.

    One figure was measured: Wan2.1 I2V 14B at 480P, bf16 on an H200, 9.0 GiB beyond the parameters
    (HEADROOM_480P_GIB). It is split in two by arithmetic. The decoded video (video_bytes: frames x 3 x pixels x 4
    bytes, twice) depends only on the pixels and frames. The rest is the transformer's (and the VAE decoder's)
    working set, which grows with the video tokens (memory-efficient attention: linear in the tokens) times the
    values one token holds at a block's widest point (ModelShape.token_width); it is scaled from the 14B's by
    those two ratios. So the 14B keeps its measured 9.0 GiB at 480P (and 480P's figure scaled by the tokens at
    720P, as before), while a small local model (a 1.3B-sized, pruned or tiny directory) is charged what its own
    widths need. On the CPU the transformer's part is float32: twice the bytes (an estimate)."""
    measured = HEADROOM_480P_GIB * GIB
    reference_video = video_bytes(AREA_480P)
    working = (measured - reference_video) * (shape.tokens(max_area) / WAN_14B_SHAPE.tokens(AREA_480P)) \
        * (shape.token_width / WAN_14B_SHAPE.token_width)
    if shape == WAN_14B_SHAPE and max_area == AREA_480P:
        how = "measured on an H200"
    elif shape == WAN_14B_SHAPE:
        how = "estimate: 480P's measured figure scaled by the tokens"
    else:
        how = "estimate: the 14B's measured 480P figure scaled by this model's tokens and widths"
    if device_type != "cuda":
        working, how = working * CPU_ACTIVATION_FACTOR, f"{how}, x{CPU_ACTIVATION_FACTOR:g} for float32 (estimate)"
    label = {AREA_480P: "480P (480x832)", 720 * 1280: "720P (720x1280)"}.get(max_area, f"{max_area} pixels")
    return int(working + video_bytes(max_area)), f"activations at {label} ({how})"


@dataclass(frozen=True)
class Setup:
    """The choices that decide where weights go and how big they are."""

    device_type: str
    transformer: str = "bf16"
    """A weight_memory transformer format: how the transformer is held ('bf16': the compute dtype)."""
    text_encoder: str = "bf16"
    float8: bool = False
    text_encoder_on_cpu: bool = False
    memory_mode: str = "none"

    def changes(self, base: Setup) -> str:
        """What to set to go from `base` to this setup, for a message."""
        parts = []
        if self.float8 and not base.float8:
            parts.append("PARTICALIZE_FLOAT8=1")
        if self.text_encoder_on_cpu and not base.text_encoder_on_cpu:
            parts.append("PARTICALIZE_TEXT_ENCODER_ON_CPU=1")
        if self.memory_mode != base.memory_mode:
            parts.append(f"PARTICALIZE_MEMORY_MODE={self.memory_mode}")
        if self.transformer != base.transformer:
            parts.append(f"a {LABELS[self.transformer]} transformer file ({FILE_HINT})")
        return " with ".join(parts)


@dataclass(frozen=True)
class Need:
    setup: Setup
    device: dict[str, int]
    """Bytes on the accelerator per part (empty on the CPU device)."""
    ram: dict[str, int]
    """Bytes in RAM per part."""
    when: str = "while generating"

    def fits(self, free_device: int, free_ram: int) -> bool:
        return sum(self.device.values()) <= free_device and sum(self.ram.values()) <= free_ram

    @property
    def total_gib(self) -> float:
        return (sum(self.device.values()) + sum(self.ram.values())) / GIB


class Sizes:
    """The bytes each component takes, per format, for one preset and compute dtype (computed once, lazily)."""

    def __init__(self, preset: ModelPreset, weights_dir: Path, compute_dtype: torch.dtype,
                 files: WeightFiles | None = None) -> None:
        from pipeline.loader import preset_dir
        from pipeline.weight_files.files import (
            directory_component_config,
            directory_text_encoder_config,
            directory_transformer_config,
        )

        directory = preset_dir(preset, weights_dir)  # its configs when on disk, else the real ones in code
        self.transformer_config = directory_transformer_config(directory)
        self.text_encoder_config = directory_text_encoder_config(directory)
        self.image_encoder_config = directory_component_config(directory, "image_encoder")
        self.vae_config = directory_component_config(directory, "vae")
        self.shape = ModelShape.of(self.transformer_config, self.vae_config)
        self.compute_dtype = compute_dtype
        self.files = files or WeightFiles()
        self._transformer: dict[str, int] = {}
        self._text_encoder: dict[str, int] = {}
        self._other: int | None = None

    def transformer(self, fmt: str) -> int:
        if fmt not in self._transformer:
            from pipeline.weight_files.memory import transformer_bytes_by_format

            missing = tuple(f for f in TRANSFORMER_FORMATS if f not in self._transformer)
            self._transformer.update(transformer_bytes_by_format(self.transformer_config, self.compute_dtype,
                                                                 missing))
        return self._transformer[fmt]

    def text_encoder(self, fmt: str) -> int:
        if fmt not in self._text_encoder:
            from pipeline.weight_files.memory import text_encoder_bytes

            self._text_encoder[fmt] = text_encoder_bytes(fmt, self.text_encoder_config, self.compute_dtype)
        return self._text_encoder[fmt]

    def clip_and_vae(self) -> int:
        if self._other is None:
            from pipeline.weight_files.memory import clip_and_vae_bytes

            self._other = clip_and_vae_bytes(self.image_encoder_config, self.vae_config)
        return self._other


def need_of(setup: Setup, sizes: Sizes, activations: tuple[int, str]) -> Need:
    """Where the bytes of `setup` go, and how many (see the module's docstring for the rules)."""
    act_bytes, act_label = activations
    compute = str(sizes.compute_dtype).removeprefix("torch.")

    def label(fmt: str) -> str:
        return compute if fmt == "bf16" else LABELS.get(fmt, fmt)

    te_label = f"text encoder ({label(setup.text_encoder)})"
    transformer_label = f"transformer ({label(setup.transformer)})"
    running = "fp8" if setup.float8 and setup.transformer == "bf16" else setup.transformer
    parts = {f"transformer ({label(running)})" if running != setup.transformer else transformer_label:
             sizes.transformer(running),
             te_label: sizes.text_encoder(setup.text_encoder),
             "image encoder and VAE (float32)": sizes.clip_and_vae()}
    if setup.device_type != "cuda":
        return Need(setup, {}, {transformer_label: sizes.transformer(setup.transformer),
                                te_label: sizes.text_encoder(setup.text_encoder),
                                "image encoder and VAE (float32)": sizes.clip_and_vae(), act_label: act_bytes})
    names = list(parts)
    if setup.memory_mode == "none":
        run = dict(parts)
        ram = {}
        if setup.text_encoder_on_cpu:
            ram[f"{te_label}, on the CPU"] = run.pop(te_label)
        run[act_label] = act_bytes
        load = {transformer_label: sizes.transformer(setup.transformer), te_label: parts[te_label],
                names[2]: parts[names[2]]}
        if sum(load.values()) > sum(run.values()):
            return Need(setup, load, ram, when="while loading (the loader places the whole model on the GPU before "
                                               "float8 or the text encoder's move to the CPU)")
        return Need(setup, run, ram)
    ram = {f"{name}, offloaded": size for name, size in parts.items()}
    if setup.memory_mode == "model_cpu_offload":
        largest = max(names, key=parts.get)
        return Need(setup, {f"{largest} (one model at a time)": parts[largest], act_label: act_bytes}, ram)
    if setup.memory_mode == "group_offload":
        staging = f"streamed leaves (estimate, {GROUP_OFFLOAD_STAGING_GIB:g} GiB)"
        return Need(setup, {names[2]: parts[names[2]], staging: int(GROUP_OFFLOAD_STAGING_GIB * GIB),
                            act_label: act_bytes}, ram)
    return Need(setup, {act_label: act_bytes}, ram)


def free_ram() -> int:
    """Available RAM in bytes: psutil's figure, else /proc/meminfo's MemAvailable."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("cannot tell the available RAM (no psutil, no MemAvailable in /proc/meminfo)") from None


def free_device(device: torch.device) -> int:
    """Free bytes on the accelerator (0 on the CPU: nothing is placed there but RAM)."""
    if device.type != "cuda":
        return 0
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def float8_available(device: torch.device) -> bool:
    """torchao float8 can be applied here (pipeline.speed.acceleration.apply_float8's own conditions)."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
            and importlib.util.find_spec("torchao") is not None)


def candidates(base: Setup, float8_ok: bool) -> Iterable[Setup]:
    """The options that change placement, each alone and the useful pairs, from `base`; then the transformer files
    from the most precise format (the first that fits is the one named)."""
    if base.device_type == "cuda":
        if float8_ok and not base.float8 and base.transformer == "bf16":
            yield replace(base, float8=True)
        if not base.text_encoder_on_cpu and base.memory_mode == "none":
            yield replace(base, text_encoder_on_cpu=True)
            if float8_ok and not base.float8 and base.transformer == "bf16":
                yield replace(base, float8=True, text_encoder_on_cpu=True)
        if base.memory_mode == "none":
            yield from (replace(base, memory_mode=mode) for mode in OFFLOAD_MODES)
    smaller = TRANSFORMER_FORMATS[TRANSFORMER_FORMATS.index(base.transformer) + 1:] \
        if base.transformer in TRANSFORMER_FORMATS else ()
    for fmt in smaller:
        yield replace(base, transformer=fmt, float8=False)
        if base.device_type == "cuda" and not base.text_encoder_on_cpu and base.memory_mode == "none":
            yield replace(base, transformer=fmt, float8=False, text_encoder_on_cpu=True)


@dataclass(frozen=True)
class Verdict:
    need: Need
    free_device: int
    free_ram: int
    fitting: list[Need]
    """Other setups that would fit, best first (at most one transformer file)."""
    smallest: Need | None = None
    """When none fits: the candidate closest to fitting."""

    @property
    def ok(self) -> bool:
        return self.need.fits(self.free_device, self.free_ram)

    def message(self, model: str, device: torch.device) -> str:
        need, where = self.need, "the GPU" if device.type == "cuda" else "RAM"

        def parts(sizes: dict[str, int]) -> str:
            return ", ".join(f"{name} {size / GIB:.1f} GiB" for name, size in sizes.items())

        short = []
        if sum(need.device.values()) > self.free_device:
            short.append(f"≈{sum(need.device.values()) / GIB:.1f} GiB on {device} {need.when} "
                         f"({parts(need.device)}), and {self.free_device / GIB:.1f} GiB is free there")
        if sum(need.ram.values()) > self.free_ram:
            short.append(f"≈{sum(need.ram.values()) / GIB:.1f} GiB of RAM ({parts(need.ram)}), and "
                         f"{self.free_ram / GIB:.1f} GiB is available")
        text = f"Not enough memory to load {model} on {device}: it needs {'; and '.join(short)}."
        if self.fitting:
            options = "; ".join(f"{n.setup.changes(need.setup)} (≈{n.total_gib:.1f} GiB)" for n in self.fitting)
            text += f" Would fit on this device: {options}."
        else:
            tried = ("float8, the text encoder on the CPU, the offload modes or a GGUF/fp8 transformer file"
                     if device.type == "cuda" else "a GGUF/fp8 transformer file (float8 and offload need a GPU)")
            text += f" None of {tried} would fit in {where} here"
            if self.smallest is not None:
                text += (f" (the smallest, {self.smallest.setup.changes(need.setup)}, needs "
                         f"≈{self.smallest.total_gib:.1f} GiB)")
            text += "; use a bigger device."
        return text + " (PARTICALIZE_MEMORY_CHECK=0 or --no-memory-check loads anyway.)"


def judge(base: Setup, sizes: Sizes, activations: tuple[int, str], device_free: int, ram_free: int,
          float8_ok: bool) -> Verdict:
    """The need of `base` against what is free, and which other setups would fit (pure arithmetic: testable)."""
    need = need_of(base, sizes, activations)
    if need.fits(device_free, ram_free):
        return Verdict(need, device_free, ram_free, [])
    fitting: list[Need] = []
    smallest: Need | None = None
    file_named = False
    for setup in candidates(base, float8_ok):
        other = need_of(setup, sizes, activations)
        if other.fits(device_free, ram_free):
            if setup.transformer != base.transformer:
                if file_named:
                    continue
                file_named = True
            fitting.append(other)
        elif smallest is None or other.total_gib < smallest.total_gib:
            smallest = other
    return Verdict(need, device_free, ram_free, fitting, None if fitting else smallest)


def transformer_file_format(path: Path) -> str:
    """The weight_memory format a transformer file is held in, read from its header (no tensor data read)."""
    from pipeline.weight_files.summary import file_format

    fmt = file_format(path)
    return fmt if fmt in TRANSFORMER_FORMATS else "gguf_Q8_0"  # another GGUF type: sized as Q8_0 (estimate)


def check_memory(preset: ModelPreset, weights_dir: Path, device: torch.device, *, float8: bool = False,
                 text_encoder_on_cpu: bool = False, memory_mode: str = "none",
                 weight_files: WeightFiles | None = None) -> Verdict | None:
    """Refuse (NotEnoughMemory) a configuration this device cannot hold; the verdict otherwise. The tiny preset
    always passes (it needs a few MiB): None."""
    if preset.is_tiny:
        return None
    files = weight_files or WeightFiles()
    files = WeightFiles(*(p if p is not None and Path(p).is_file() else None  # a missing file: the loader says so
                          for p in (files.transformer, files.text_encoder)))
    compute = serving_dtype_for(device)
    base = Setup(device.type,
                 transformer=transformer_file_format(files.transformer) if files.transformer else "bf16",
                 text_encoder=_text_encoder_format(files.text_encoder) if files.text_encoder else "bf16",
                 float8=float8 and float8_available(device), text_encoder_on_cpu=text_encoder_on_cpu,
                 memory_mode=memory_mode if device.type == "cuda" else "none")
    sizes = Sizes(preset, weights_dir, compute, files)
    verdict = judge(base, sizes, activation_bytes(preset.max_area, device.type, sizes.shape),
                    free_device(device), free_ram(), float8_available(device))
    if not verdict.ok:
        raise NotEnoughMemory(verdict.message(preset.name, device))
    log.info("memory check: %s needs ≈%.1f GiB on %s (%.1f GiB free) and ≈%.1f GiB of RAM (%.1f GiB available)",
             preset.name, sum(verdict.need.device.values()) / GIB, device, verdict.free_device / GIB,
             sum(verdict.need.ram.values()) / GIB, verdict.free_ram / GIB)
    return verdict


def _text_encoder_format(path: Path) -> str:
    fmt = transformer_file_format(path)
    return fmt if fmt in ("bf16", "fp8", "fp8_scaled") else "bf16"
