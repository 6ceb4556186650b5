"""The server-side subcommands (serve, worker, keys); kept apart so `generate` never imports the web stack."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from particalize.settings import Settings


def add_server_commands(sub: argparse._SubParsersAction, model_flags: Callable, settings_of: Callable) -> None:
    def db_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, help="where the SQLite database and the outputs live (default ./data)")
        p.add_argument("--database-url", help="SQLAlchemy URL, e.g. postgresql://user@host/db (default: SQLite)")

    serve = sub.add_parser("serve", help="run the Wiro-compatible HTTP server (with its GPU workers)")
    model_flags(serve)
    db_flags(serve)
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes to start, one per GPU (0: API only)")
    serve.add_argument("--public-base-url", help="base of output URLs (default http://host:port)")
    serve.add_argument("--allow-unauthenticated-public", action="store_const", const=True, default=None,
                       help="listen on a non-loopback host although no API keys are configured")
    serve.set_defaults(func=lambda args: cmd_serve(args, settings_of))

    worker = sub.add_parser("worker", help="run one GPU worker against the (shared) task database")
    model_flags(worker)
    db_flags(worker)
    worker.add_argument("--slot", type=int, default=0, help="this worker's number on this machine (its GPU)")
    worker.set_defaults(func=lambda args: cmd_worker(args, settings_of))

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="print a new key and secret")
    create.add_argument("--key-only", action="store_true", help="a key for Wiro's 'API key only' mode")
    create.set_defaults(func=cmd_keys_create)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_refusal(settings: Settings, has_keys: bool) -> str | None:
    """Why the server must not listen where the settings say, or None."""
    if has_keys or is_loopback(settings.host) or settings.allow_unauthenticated_public:
        return None
    return (
        f"refusing to listen on {settings.host} with no API keys configured: anyone who reaches it could use "
        "the GPU. Create keys (`particalize keys create`, then PARTICALIZE_API_KEYS=key:secret), listen on "
        "127.0.0.1, or set PARTICALIZE_ALLOW_UNAUTHENTICATED_PUBLIC=1 (--allow-unauthenticated-public)."
    )


def describe_environment(settings: Settings, model_is_explicit: bool) -> tuple[Settings, list[str], str | None]:
    """What `serve` says at start about the GPU and the weights, the settings to serve with (the tiny
    preset when the default model cannot run here), and an error when it cannot serve at all. An API-only
    replica (--workers 0) runs no model: it does not even import torch (seconds and memory saved)."""
    if settings.workers == 0:
        return settings, ["workers: none in this process (--workers 0); tasks wait for a `particalize worker`"], None

    import torch

    from particalize.compose import weight_file_sources
    from pipeline.errors import WeightFormatError, WeightsMissing
    from pipeline.loader import fetch_hint, missing_files, preset_dir
    from pipeline.presets import get_preset

    lines: list[str] = []
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"GPU: {torch.cuda.device_count()} found ({names})")
        gpu = True
    else:
        lines.append("GPU: none found (torch sees no CUDA device); models run on the CPU")
        gpu = False
    preset = get_preset(settings.model)
    problem = None
    if preset.is_tiny:
        lines.append("weights: the tiny preset is built in code (random weights: its videos are noise; "
                     "for trying the API)")
        try:
            lines.extend(weight_file_lines(settings, preset))
            lines.extend(lora_lines(settings))
        except (WeightsMissing, WeightFormatError) as exc:
            problem = str(exc)
            lines.append(f"weights: NOT USABLE: {exc}")
    else:
        replaced = [preset_dir(preset, settings.weights_dir) / role for role in weight_file_sources(settings)]
        missing = [] if settings.random_weights else [
            p for p in missing_files(preset_dir(preset, settings.weights_dir))
            if not any(p == r or r in p.parents for r in replaced)]
        if settings.random_weights:
            from pipeline.random_weights import NOISE_WARNING

            lines.append(f"weights: {NOISE_WARNING}; {preset.name} is built in code at its real size "
                         "(--random-weights)")
        elif missing:
            problem = f"the weights of {preset.name} are not on disk (missing {missing[0]}): {fetch_hint(preset)}"
            lines.append(f"weights: NOT FOUND: {problem}")
        else:
            lines.append(f"weights: {preset.name} found in {preset_dir(preset, settings.weights_dir)}")
        try:
            lines.extend(weight_file_lines(settings, preset))
            lines.extend(lora_lines(settings))
        except (WeightsMissing, WeightFormatError) as exc:
            problem = problem or str(exc)
            lines.append(f"weights: NOT USABLE: {exc}")
        if not gpu and problem is None:
            problem_cpu = f"{preset.name} on a CPU takes hours per video"
            if not model_is_explicit:
                problem = problem_cpu
            else:
                lines.append(f"warning: {problem_cpu}")
    if problem is not None:
        if not model_is_explicit and not preset.is_tiny:
            lines.append(f"serving the tiny preset instead of {preset.name} ({problem}); set --model to insist")
            return settings.with_overrides(model="tiny"), lines, None
        return settings, lines, problem
    return settings, lines, None


def weight_file_lines(settings: Settings, preset: Any) -> list[str]:
    """The banner's lines for the single weight files configured: each file's format from its header, its size and
    the memory it will take (estimated; each worker reports the exact figure in /ready once loaded)."""
    import torch

    from particalize.compose import weight_files
    from pipeline.devices import pick_device, serving_dtype_for
    from pipeline.errors import WeightFormatError
    from pipeline.weight_files.summary import summarize

    files = weight_files(settings)  # WeightsMissing naming the setting (and the fetch command) when one is not there
    if not files.any:
        return []
    if settings.random_weights and not preset.is_tiny:
        raise WeightFormatError("--random-weights builds every component in code: unset "
                                "PARTICALIZE_TRANSFORMER_FILE and PARTICALIZE_TEXT_ENCODER_FILE, or drop "
                                "--random-weights")
    if preset.is_tiny:
        from pipeline.tiny import TINY_TRANSFORMER_CONFIG

        configs: dict[str, Any] = {"transformer": dict(TINY_TRANSFORMER_CONFIG), "text_encoder": None}
        dtype = torch.float32
    else:
        from pipeline.loader import preset_dir
        from pipeline.weight_files.files import directory_text_encoder_config, directory_transformer_config

        model_dir = preset_dir(preset, settings.weights_dir)
        configs = {"transformer": directory_transformer_config(model_dir),
                   "text_encoder": directory_text_encoder_config(model_dir)}
        dtype = serving_dtype_for(pick_device(settings.device))
    return [f"{role.replace('_', ' ')} file: {summarize(path, role, configs[role], dtype).describe()}"
            for role, path in (("transformer", files.transformer), ("text_encoder", files.text_encoder))
            if path is not None]


def lora_lines(settings: Settings) -> list[str]:
    """The start-up banner's LoRA lines: the stack in order with strengths, the speed LoRA and the modes."""
    from particalize.compose import lora_sources
    from weights.locate import speed_lora_file, stack_files

    configured = lora_sources(settings)
    stack = stack_files(configured)
    lines = [f"LoRA {i}: {path} (strength {source.strength:g})" for i, (source, path) in enumerate(stack, 1)]
    if not stack:
        lines.append("LoRA: none configured (plain Wan2.1 output, not Particalize)")
    if stack and settings.fuse_lora:
        lines.append("LoRA: fused into the weights at load")
    speed = speed_lora_file(configured)
    if speed is None:
        lines.append("mode: normal (fast mode needs a step-distilled LoRA: PARTICALIZE_SPEED_LORA)")
        return lines
    source, path = speed
    lines.append(f"speed LoRA (fast mode): {path} (strength {source.strength:g}); fast = {settings.fast_steps} steps, "
                 f"scale {settings.fast_scale:g}, flow shift {settings.fast_flow_shift:g}")
    lines.append(f"mode: {settings.mode} by default; a request may send mode 'normal' or 'fast'")
    return lines


TINY_LIMITS = {"max_pixels": 320 * 192, "max_work": 81 * 320 * 192 * 100}
"""Default limits when serving the tiny preset, so that trying the API on a laptop never queues a multi-hour task
by accident (a 1280x720, 81-frame, 50-step request runs ~165 s per step on a CPU). Measured on this project's
2-core machine: 320x192, 81 frames, 3 steps took 18.6 s (mostly the VAE decode), so the largest task allowed
(320x192, 81 frames, 100 steps) takes minutes."""


def tiny_limits(settings: Settings) -> tuple[Settings, str | None]:
    """For the tiny preset: TINY_LIMITS in place of the limits the operator did not set (one set in the environment
    or by a flag is kept, whatever its value, even the default), and the line `serve` prints about it."""
    if settings.model != "tiny":
        return settings, None
    tighter = {name: value for name, value in TINY_LIMITS.items()
               if name not in settings.model_fields_set and value < getattr(settings, name)}
    if not tighter:
        return settings, None
    settings = settings.with_overrides(**tighter)
    return settings, (
        f"limits for the tiny preset: width x height at most {settings.max_pixels} pixels, numFrames x width x "
        f"height x steps at most {settings.max_work} (set PARTICALIZE_MAX_PIXELS / PARTICALIZE_MAX_WORK to change)"
    )


def cmd_serve(args: argparse.Namespace, settings_of: Callable) -> int:
    import uvicorn

    from particalize.compose_server import build_app
    from server.auth import load_api_keys

    settings = settings_of(args).with_overrides(allow_unauthenticated_public=args.allow_unauthenticated_public)
    keys = load_api_keys(settings.api_keys, settings.api_keys_file)
    refusal = bind_refusal(settings, bool(keys))
    if refusal:
        print(f"error: {refusal}", flush=True)
        return 2
    from particalize.tools import CatalogueError, check_fit, tool_set

    try:
        tools = tool_set(settings)
    except CatalogueError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    explicit = args.model is not None or bool(os.environ.get("PARTICALIZE_MODEL"))
    settings, lines, problem = describe_environment(settings, explicit)
    if problem is None and settings.workers:
        from particalize.compose import parallel_refusal

        problem = parallel_refusal(settings)
    for line in lines:
        print(line, flush=True)
    if problem is not None:
        print(f"error: cannot serve {settings.model}: {problem}", flush=True)
        return 2
    try:  # each tool's LoRAs against the base's shapes, from their headers: a misfit stops the start, not a worker
        check_fit(tools, settings)
    except CatalogueError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    settings, limits_line = tiny_limits(settings)
    if limits_line:
        print(limits_line, flush=True)
    auth = f"{len(keys)} API key(s)" if keys else (
        "none (no API keys configured; loopback only). To require signed requests, create a key with "
        "`particalize keys create` and start with PARTICALIZE_API_KEYS=key:secret"
    )
    print(f"auth: {auth}; database: {_redacted(settings.sqlalchemy_url)}; workers: {settings.workers}", flush=True)
    if settings.tools_file is not None:
        print(f"tools: {', '.join(tool.slug for tool in tools.catalogue.tools)}", flush=True)
    print(f"serving {settings.model} on http://{settings.host}:{settings.port}", flush=True)
    # JSON logs: uvicorn's own log config would print its lines as text, so its loggers go to ours instead.
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    # SIGTERM/Ctrl-C: uvicorn stops accepting, lets in-flight requests finish for up to the grace period,
    # then the app's shutdown stops the workers (each with the grace period again for its running task).
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info",
                access_log=settings.access_log, timeout_graceful_shutdown=drain_seconds(settings),
                log_config=log_config)
    return 0


API_DRAIN_CAP_SECONDS = 30.0
"""API requests are short; only live progress streams last, and they resume (Last-Event-ID) elsewhere: a
stopping API does not wait the workers' long grace period for them."""


def drain_seconds(settings: Settings) -> float:
    """How long a stopping API process waits for in-flight requests (a live progress stream is cut then)."""
    return min(settings.shutdown_grace_seconds, API_DRAIN_CAP_SECONDS)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_worker(args: argparse.Namespace, settings_of: Callable) -> int:
    """One worker until SIGTERM/SIGINT: then it claims nothing more, finishes its running task within
    shutdown_grace_seconds (else puts it back in the queue) and exits 0; a second signal ends the wait."""
    from particalize.compose_server import open_storage
    from particalize.core_options import GeneratorFactory, settings_given_by_serve, worker_options
    from server.processes.parent import PARENT_ENV, die_with_parent
    from server.processes.shutdown import StopRequest, stop_on_signals
    from server.wakeup import pipe_wakeup_from_env
    from server.worker import run_worker, worker_id_for
    from server.worker_reports import reporter_from_env

    parent = os.environ.pop(PARENT_ENV, None)
    if parent:
        die_with_parent(int(parent))
    settings = settings_given_by_serve() or settings_of(args)
    if settings.context_parallel != "none" or settings.parallel_degree > 1:
        exit_now(_parallel_worker(settings, args.slot))
    options = worker_options(settings)
    report = reporter_from_env(worker_id_for(options.node_name, args.slot))
    wakeup = pipe_wakeup_from_env(options.poll_seconds, options.safety_poll_seconds)  # serve's own, on SQLite
    stop = StopRequest(settings.shutdown_grace_seconds)
    stop_on_signals(stop)
    code = run_worker(options, open_storage(settings), GeneratorFactory(settings), stop, slot=args.slot,
                      parent_pid=int(parent) if parent else None, report=report, wakeup=wakeup)
    exit_now(code)


def _parallel_worker(settings: Settings, slot: int) -> int:
    """One worker over `parallel_degree` processes (server/worker/ranks.py); an impossible combination is refused
    before anything loads, with the exit code that tells a supervisor not to restart it."""
    import functools

    from particalize.compose import parallel_refusal
    from particalize.compose_server import open_storage
    from particalize.core_options import rank_job
    from server.processes.exit_codes import EXIT_LOAD_FAILED
    from server.processes.shutdown import StopRequest, stop_on_signals
    from server.worker.ranks import launch_ranks

    refusal = parallel_refusal(settings)
    if refusal:
        logging.getLogger("particalize.worker").error("worker slot %d cannot start: %s", slot, refusal)
        print(f"error: {refusal}", file=sys.stderr, flush=True)
        return EXIT_LOAD_FAILED
    stop = StopRequest(settings.shutdown_grace_seconds)
    stop_on_signals(stop)
    return launch_ranks(rank_job(settings, slot, functools.partial(open_storage, settings)), stop)


def exit_now(code: int) -> NoReturn:
    """Leave without the interpreter's teardown of torch, diffusers and transformers, which takes seconds
    (more on a busy machine) and would eat into the stop deadline for nothing: run_worker has already
    recorded the worker's state and closed the database; only the log and stdio need flushing."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from server.auth import new_key_pair

    key, secret = new_key_pair()
    entry = f"{key}:" if args.key_only else f"{key}:{secret}"
    print(f"x-api-key: {key}")
    if not args.key_only:
        print(f"secret:    {secret}")
    print(f"\nserver side: PARTICALIZE_API_KEYS={entry}  (comma-separate several; or one per line in the file "
          "PARTICALIZE_API_KEYS_FILE names)")
    return 0
