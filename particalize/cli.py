"""`particalize`: generate, weights, serve, worker, batch, keys. Flags override PARTICALIZE_* settings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from particalize.settings import Settings
from pipeline.fast import MODES
from pipeline.inputs import ToolInput, tool_inputs

if TYPE_CHECKING:
    from server.tool_info import Tool

TOOL_FLAGS: list[ToolInput] = [spec for spec in tool_inputs() if not spec.advanced]
"""Every input of the hosted tool is a flag (`mode`, an advanced input, is `--mode`: the run's default mode)."""
_METAVAR = {"number": "N", "float": "X", "textarea": "TEXT", "select": "CHOICE"}


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="preset (wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p, tiny) or a local directory")
    p.add_argument("--weights-dir", type=Path)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"])
    p.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]",
                   help="a LoRA .safetensors (or hf://owner/repo/file.safetensors); repeat to stack several, in "
                        "order (replaces PARTICALIZE_LORA_PATH and PARTICALIZE_LORAS)")
    p.add_argument("--lora-strength", type=float, help="strength of a --lora that gives none (default 1)")
    p.add_argument("--fuse-lora", action="store_const", const=True, default=None)
    p.add_argument("--lora-strict", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse a LoRA with keys that change nothing (default); --no-lora-strict loads the rest")
    p.add_argument("--speed-lora", metavar="PATH[:STRENGTH]", help="step-distilled LoRA for fast mode")
    p.add_argument("--tools", dest="tools_file", type=Path, metavar="FILE",
                   help="a TOML catalogue of further LoRA tools (PARTICALIZE_TOOLS_FILE)")
    p.add_argument("--mode", choices=MODES, help="default mode (fast needs --speed-lora, cached --step-cache mag)")
    p.add_argument("--step-cache", choices=["none", "first_block", "taylorseer", "mag"],
                   help="reuse transformer outputs across steps; mag: calibrated step skipping for mode cached")
    p.add_argument("--random-weights", action="store_const", const=True, default=None,
                   help="build the real-size model with random weights (no download): videos are NOISE; "
                   "for measuring speed and memory")
    p.add_argument("--transformer-file", metavar="PATH_OR_HF_URL",
                   help="a single-file transformer in place of the preset's: .safetensors (original Wan or ComfyUI "
                        "layout, bf16/fp16/fp8/fp8 scaled) or .gguf, a path or hf://owner/repo/file")
    p.add_argument("--text-encoder-file", metavar="PATH_OR_HF_URL",
                   help="a UMT5-XXL text encoder .safetensors (bf16, fp8, ComfyUI fp8 scaled) in place of the preset's")
    p.add_argument("--context-parallel", choices=["ulysses", "ring"],
                   help="split one video over --parallel-degree processes (one a GPU; gloo processes on the CPU)")
    p.add_argument("--parallel-degree", type=int, metavar="N", help="processes one video is split over")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the transformer blocks (default: on with CUDA); --no-compile opts out")
    p.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse a model the device has no memory for, before loading it (default); "
                        "--no-memory-check loads anyway")


def _tool_flags(p: argparse.ArgumentParser) -> None:
    """One flag per tool input, read from the parameter model. Values stay text: parse_params checks them as it
    checks a request's, with the same messages."""
    for spec in TOOL_FLAGS:
        default = f" (default: {spec.default})" if spec.default else ""
        p.add_argument(spec.flag, dest=spec.name, metavar=_METAVAR[spec.kind], help=f"{spec.help}{default}")


def _tool_values(args: argparse.Namespace) -> dict[str, str]:
    """The tool flags given, under their GenerationParams names."""
    return {spec.name: getattr(args, spec.name) for spec in TOOL_FLAGS if getattr(args, spec.name) is not None}


def _settings(args: argparse.Namespace) -> Settings:
    keys = ("model", "weights_dir", "device", "lora_strength", "fuse_lora", "host", "port",
            "data_dir", "database_url", "workers", "public_base_url", "lora_strict", "speed_lora", "mode",
            "random_weights", "compile", "transformer_file", "text_encoder_file", "memory_check", "context_parallel",
            "parallel_degree", "step_cache", "tools_file")
    settings = Settings().with_overrides(**{k: getattr(args, k, None) for k in keys})
    if getattr(args, "lora", None):  # the --lora list is the whole stack
        return settings.model_copy(update={"lora_path": None, "lora_repo": None}).with_overrides(
            loras=",".join(args.lora))
    return settings


def _tool_settings(args: argparse.Namespace) -> tuple[Settings, Tool]:
    """`generate`'s and `batch`'s settings for one tool of the catalogue (--tool), and that tool."""
    from particalize.tools import for_tool
    from server.tool_info import DEFAULT_SLUG

    return for_tool(_settings(args), args.tool or DEFAULT_SLUG)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="particalize", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make one video offline")
    gen.add_argument("--image", required=True, help="start image: a path or an http(s) URL")
    gen.add_argument("--out", type=Path, default=Path("out.mp4"))
    gen.add_argument("--tool", metavar="OWNER/PROJECT", help="a tool of the catalogue (--tools): its LoRAs, defaults "
                     "and trigger (default: codexq/Particalize)")
    _model_flags(gen)
    _tool_flags(gen)
    gen.set_defaults(func=cmd_generate)

    batch = sub.add_parser("batch", help="many videos from a JSONL file, resumable (tool flags are row defaults)")
    batch.add_argument("file", type=Path, help="JSONL: one {\"image\": ..., tool inputs, \"id\"?} per line")
    batch.add_argument("--out", type=Path, required=True, help="folder for MP4s, contact sheets and the manifest")
    batch.add_argument("--tool", metavar="OWNER/PROJECT", help="a tool of the catalogue (--tools): its LoRAs, "
                       "defaults and trigger for every row (default: codexq/Particalize)")
    _model_flags(batch)
    _tool_flags(batch)
    batch.set_defaults(func=cmd_batch)

    weights = sub.add_parser("weights", help="fetch or verify model and LoRA weights")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    fetch = wsub.add_parser("fetch", help="download the preset and the configured LoRA (resumable)")
    _model_flags(fetch)
    fetch.add_argument("--lora-repo")
    fetch.add_argument("--lora-file")
    fetch.add_argument("--skip-model", action="store_true")
    fetch.set_defaults(func=cmd_weights_fetch)
    verify = wsub.add_parser("verify", help="check what is on disk, offline")
    _model_flags(verify)
    verify.add_argument("--quick", action="store_true", help="sizes only, no sha256")
    verify.set_defaults(func=cmd_weights_verify)

    from particalize.calibrate import add_calibrate_command
    from particalize.cli_server import add_server_commands

    add_calibrate_command(sub, _model_flags, _tool_flags, _settings, _tool_values)
    add_server_commands(sub, _model_flags, _settings)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from particalize import compose
    from particalize.image_source import read_image_source
    from particalize.tools import defaults_by_name
    from pipeline.images import decode_image
    from pipeline.params import parse_params

    settings, tool = _tool_settings(args)
    params = parse_params({**defaults_by_name(tool), **_tool_values(args)}, compose.limits(settings))
    params = params.model_copy(update={"prompt": tool.triggered(params.prompt)})
    image = decode_image(read_image_source(args.image), field="--image")
    if settings.context_parallel != "none" or settings.parallel_degree > 1:
        refusal = compose.parallel_refusal(settings)
        if refusal:
            raise ValueError(refusal)
        from particalize.parallel_generate import generate_over_ranks

        print(json.dumps(generate_over_ranks(settings, params, image, args.out), indent=2))
        return 0
    generator = compose.make_generator(settings)
    for part in generator.degraded:  # also logged as warnings while loading; repeated here above the progress bar
        print(f"warning: {part}", file=sys.stderr, flush=True)
    bar = tqdm(total=params.steps, unit="step", desc="denoising")

    def progress(p: object) -> None:
        bar.n = p.step  # type: ignore[attr-defined]
        bar.refresh()

    try:
        video = generator.render(params, image, args.out, progress=progress)
    finally:
        bar.close()
    recorded = video.schedule.record() if video.schedule is not None else {}  # cached mode: steps computed/skipped
    print(json.dumps({"output": str(args.out), "parameters": {**video.params.wiro_inputs(), **recorded},
                      "timings": {k: round(v, 3) for k, v in video.timings.items()}}, indent=2))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from particalize.batch import batch_command
    from particalize.tools import defaults_by_name

    settings, tool = _tool_settings(args)
    if settings.context_parallel != "none" or settings.parallel_degree > 1:
        raise ValueError("batch runs its videos in one process: context parallelism is for generate, serve and worker")
    return batch_command(args.file, args.out, settings, {**defaults_by_name(tool), **_tool_values(args)},
                         tool.triggered)


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from particalize.compose import lora_sources
    from particalize.tools import tool_set
    from pipeline.presets import get_preset
    from weights.fetch import fetch_lora, fetch_model
    from weights.locate import stack_sources

    settings = _settings(args).with_overrides(lora_repo=args.lora_repo, lora_file=args.lora_file)
    if not args.skip_model:
        preset = get_preset(settings.model)
        if preset.repo_id is None:
            print(f"model {preset.name} needs no download")
        else:
            print(f"fetched {preset.repo_id} into {fetch_model(preset, settings.weights_dir, settings.hf_token)}")
    configured = lora_sources(settings)
    tools = tool_set(settings, check_files=False)  # the catalogue's tools' LoRAs too (--tools)
    sources = stack_sources(configured) + [s for s in [configured.speed_lora] if s] + [
        s for stack in tools.loras.values() for s in stack]
    for source in sources:
        if source.is_hub:
            path = fetch_lora(source.repo, source.file, settings.weights_dir, source.revision, settings.hf_token)
            print(f"fetched LoRA {source.text} into {path}")
        else:
            print(f"LoRA {source.path}: a local file, nothing to fetch")
    if not sources:
        print("no LoRA configured: set PARTICALIZE_LORA_REPO and PARTICALIZE_LORA_FILE, PARTICALIZE_LORA_PATH, "
              "or PARTICALIZE_LORAS")
    fetch_weight_files(settings)
    return 0


def fetch_weight_files(settings: Settings) -> None:
    """The transformer and text-encoder files configured (--transformer-file, --text-encoder-file), from the hub."""
    from particalize.compose import weight_file_sources
    from weights.fetch import fetch_single_file

    for role, source in weight_file_sources(settings).items():
        what = role.replace("_", " ")
        if source.is_hub:
            path = fetch_single_file(source, settings.weights_dir, settings.hf_token)
            print(f"fetched {what} file {source.text} into {path}")
        else:
            print(f"{what} file {source.path}: a local file, nothing to fetch")


def cmd_weights_verify(args: argparse.Namespace) -> int:
    from particalize.compose import lora_sources, weight_file_sources
    from particalize.tools import check_loras, tool_set
    from pipeline.loader import preset_dir
    from pipeline.presets import get_preset
    from weights.locate import speed_lora_file, stack_files
    from weights.manifest import read_manifest
    from weights.single_file import source_path, verify_source
    from weights.verify import Report, verify_directory

    settings = _settings(args)
    configured = lora_sources(settings)
    preset = get_preset(settings.model)
    files = weight_file_sources(settings)
    reports = []
    if not preset.is_tiny:
        report = verify_directory(preset_dir(preset, settings.weights_dir), full_hash=not args.quick)
        replaced = [report.directory / role for role in files]  # components a file replaces need no weights here
        report.problems = [p for p in report.problems if not _missing_under(p, replaced)]
        reports.append(report)
    elif read_manifest(preset_dir(preset, settings.weights_dir)) is not None:  # what `calibrate` made for it
        reports.append(verify_directory(preset_dir(preset, settings.weights_dir), full_hash=not args.quick,
                                        is_model=False))
    loras = [path for _, path in stack_files(configured)]
    speed = speed_lora_file(configured)
    if speed is not None:
        loras.append(speed[1])
    tool_loras = check_loras(tool_set(settings, check_files=False), settings)  # the catalogue's (--tools)
    loras += [Path(check.file) for check in tool_loras if not check.missing]
    for folder in dict.fromkeys(path.parent for path in loras):  # every LoRA's folder, once
        reports.append(verify_directory(folder, full_hash=not args.quick, is_model=False))
    for source in files.values():
        path = source_path(source, settings.weights_dir)
        reports.append(Report(path, checked=1, problems=verify_source(source, settings.weights_dir,
                                                                       full_hash=not args.quick)))
    ok = True
    for report in reports:
        status = "ok" if report.ok else "FAILED"
        print(f"{report.directory}: {status} ({report.checked} files checked)")
        for problem in report.problems:
            print(f"  {problem}")
        ok &= report.ok
    for check in tool_loras:  # each tool's LoRA against the base's shapes, from its header
        print(f"tool {check.slug}: {check.file}: {'ok' if check.problem is None else 'FAILED'}")
        if check.problem is not None:
            print(f"  {check.problem}")
        ok &= check.problem is None
    if not reports and not tool_loras:
        print(f"model {preset.name} has no files to verify")
    return 0 if ok else 1


def _missing_under(problem: str, folders: list[Path]) -> bool:
    """A 'missing' problem about a file in one of `folders` (or the folder itself)."""
    if not problem.endswith(": missing"):
        return False
    path = Path(problem.removesuffix(": missing"))
    return any(path == folder or folder in path.parents for folder in folders)


def _log_format() -> str:
    """PARTICALIZE_LOG_FORMAT via the settings; text when the settings do not validate (the command says why)."""
    try:
        return Settings().log_format
    except ValueError:
        return "text"


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import PipelineError
    from server.logs import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(_log_format(), verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except (PipelineError, ValueError, FileNotFoundError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


def one_line(exc: BaseException) -> str:
    """An error as one line: a settings validation error by its messages alone (pydantic's text spans lines)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
