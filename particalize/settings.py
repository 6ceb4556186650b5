"""The one typed settings object: environment (PARTICALIZE_*), then CLI flags on top."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".cache" / "particalize"


def parse_json_object(text: str | None, variable: str) -> dict[str, Any]:
    """A setting that holds a JSON object (empty or unset: {}); anything else is an error naming `variable`."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{variable} is not valid JSON ({exc}); give a JSON object, e.g. "
                         '{"endpoint_url": "http://minio:9000", "key": "...", "secret": "..."}') from None
    if not isinstance(value, dict):
        raise ValueError(f"{variable} must be a JSON object of fsspec options, not a JSON {type(value).__name__}")
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARTICALIZE_", env_file=None, extra="ignore",
                                      hide_input_in_errors=True)  # errors must not echo secrets (keys, storage options)

    # --- model and weights -------------------------------------------------------------------
    model: str = Field(
        "wan2.1-i2v-14b-480p",
        description="Preset name (wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p, tiny) or a local diffusers directory.",
    )
    weights_dir: Path = Field(
        default_factory=lambda: _default_home() / "weights",
        description="Where `particalize weights fetch` puts model snapshots and the LoRA.",
    )
    lora_path: Path | None = Field(None, description="Local .safetensors file of the Particalize LoRA.")
    lora_repo: str | None = Field(None, description="Hub repo id holding the LoRA (operator-supplied).")
    lora_file: str | None = Field(None, description="File name of the LoRA inside lora_repo.")
    lora_revision: str | None = None
    lora_strength: float = Field(1.0, ge=0.0, le=4.0)
    fuse_lora: bool = Field(False, description="Fuse the LoRA into the weights: no per-step LoRA cost.")
    require_lora: bool = Field(
        False, description="Refuse to start without a LoRA (a Particalize server without it is plain Wan)."
    )
    loras: str | None = Field(
        None, description="More LoRAs stacked after LORA_PATH, each with its strength: 'SOURCE[:STRENGTH],...' where "
        "SOURCE is a .safetensors path or hf://owner/repo/file.safetensors (e.g. /m/a.safetensors:0.8,/m/b.safetensors)"
    )
    tools_file: Path | None = Field(
        None, description="A TOML catalogue of further Wan2.1 LoRA tools served by the same workers ([[tools]] "
        "tables: slug, loras, title, ...; README's 'More tools'); unset: codexq/Particalize only."
    )
    lora_strict: bool = Field(
        True, description="Refuse a LoRA any key of which changes nothing; false: load what fits, log the rest."
    )
    speed_lora: str | None = Field(
        None, description="Step-distilled LoRA for fast mode, 'SOURCE[:STRENGTH]' (e.g. lightx2v's Wan2.1 I2V 480P "
        "StepDistill-CfgDistill LoRA); switched on per request, under the LoRAs above."
    )
    mode: Literal["normal", "cached", "fast"] = Field(
        "normal", description="Default mode of a request that names none; fast needs speed_lora, cached needs "
        "step_cache mag."
    )
    fast_steps: int = Field(4, ge=1, description="Denoising steps in fast mode (the distilled LoRA's 4).")
    fast_scale: float = Field(1.0, ge=0.0, le=30.0, description="Guidance scale in fast mode (1: no guidance).")
    fast_flow_shift: float = Field(5.0, gt=0.0, le=50.0, description="Flow shift in fast mode (its authors' 5).")
    transformer_file: str | None = Field(
        None, description="A single-file transformer replacing the preset's: a local .safetensors (original Wan or "
        "ComfyUI layout; fp32/bf16/fp16/fp8/fp8 scaled) or .gguf path, or hf://owner/repo/file (fetched by "
        "`particalize weights fetch`). With model tiny it replaces the tiny transformer."
    )
    text_encoder_file: str | None = Field(
        None, description="A UMT5-XXL text encoder as one .safetensors file (bf16, fp8, ComfyUI's fp8 scaled) "
        "replacing the preset's: a local path or hf://owner/repo/file."
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    hf_token: str | None = Field(None, description="Token for gated or private hub repos (fetch only).")

    # --- speed and memory (each measured in benchmarks/; see benchmarks/README.md) ----------------
    attention_backend: str = Field(
        "auto", description="diffusers attention backend: auto, native, flash, _flash_3, sage, ... (falls back, logged)"
    )
    compile: bool | None = Field(
        None, description="torch.compile the transformer's repeated blocks, warmed up at start. Unset: on with CUDA "
        "(no offload), off on the CPU; --no-compile / 0 opts out."
    )
    compile_dynamic: bool = Field(True, description="Dynamic shapes: no recompilation when the video size changes.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = Field(
        None, description="torch.compile mode; max-autotune-no-cudagraphs autotunes the GEMMs (longer first compile)."
    )
    compile_cache: bool = Field(True, description="Keep compiled code across restarts (in compile_cache_dir).")
    compile_cache_dir: Path | None = Field(None, description="Default: data_dir/compile-cache.")
    fuse_qkv: bool = Field(False, description="One matmul for q, k, v (diffusers fuse_qkv_projections): exact.")
    text_encoder_on_cpu: bool = Field(
        False, description="Keep the text encoder (11 GB in bf16) on the CPU; prompts are encoded there and cached."
    )
    random_weights: bool = Field(
        False, description="Build the real-size model with random weights instead of loading it: every video is "
        "noise. For measuring speed and memory (and sizing a GPU) before downloading the weights."
    )
    memory_check: bool = Field(
        True, description="Check before loading that the device has the memory the configuration needs, and refuse "
        "with what would fit when it has not (0: load anyway)."
    )
    cfg_batch: bool = Field(False, description="Batch the cond and uncond guidance branches in one forward.")
    step_cache: Literal["none", "first_block", "taylorseer", "mag"] = Field(
        "none", description="Reuse transformer outputs across denoising steps (approximate). first_block and "
        "taylorseer: every run; mag: calibrated step skipping (MagCache) for requests in mode cached, every step "
        "computed in mode normal."
    )
    mag_threshold: float = Field(0.24, gt=0, description="mag: accumulated error up to which a step is skipped "
                                 "(LightX2V's published 0.24; diffusers' default 0.06 skips less).")
    mag_max_skip_steps: int = Field(6, ge=0, description="mag: most steps skipped in a row (K; published 6).")
    mag_retention_ratio: float = Field(0.2, ge=0, le=1, description="mag: first fraction of steps always computed.")
    mag_calibration: Path | None = Field(
        None, description="mag: a calibration file to use (default: the one `particalize calibrate` wrote next to "
        "the weights, else the one shipped for the preset: Wan2.1-I2V-14B-480P's)."
    )
    step_cache_threshold: float = Field(0.05, gt=0, description="first_block: residual change that forces compute.")
    step_cache_interval: int = Field(3, ge=1, description="taylorseer: steps predicted between full computations.")
    memory_mode: Literal["none", "model_cpu_offload", "group_offload", "sequential_cpu_offload"] = "none"
    vae_tiling: bool = False
    float8: bool = Field(False, description="float8 transformer weights via torchao (Ada/Hopper GPUs).")
    context_parallel: Literal["none", "ring", "ulysses"] = Field(
        "none", description="Split one video over parallel_degree processes (one a GPU): generate, serve, worker."
    )
    parallel_degree: int = Field(1, ge=1, description="Processes (GPUs) one video is split over with context_parallel.")
    parallel_timeout_seconds: float = Field(
        600.0, gt=0, description="A collective of the context-parallel group waiting longer fails the run."
    )
    encode_cache_size: int = Field(16, ge=0, description="Prompt and image encodings kept per identical input.")

    model_max_area: int | None = Field(
        None, ge=256, description="Pixel budget (width x height) of a task that leaves width/height at 0, for a local "
        "snapshot whose metadata does not tell 480P from 720P (a preset knows its own)."
    )

    # --- request limits ------------------------------------------------------------------------
    max_num_frames: int = Field(161, ge=1)
    max_steps: int = Field(100, ge=1)
    max_side: int = Field(1920, ge=16)
    max_pixels: int = Field(1280 * 720, ge=256)
    max_work: int = Field(
        81 * 1280 * 720 * 50, ge=1,
        description="Most numFrames x width x height x steps one task may ask for (a 720P, 81-frame, 50-step video).",
    )

    # --- server --------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Field(default_factory=lambda: Path("data"))
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir.")
    database_listen_url: str | None = Field(
        None, description="PostgreSQL only: the URL of the connections that LISTEN for the task store's notifications "
        "(one per worker process, one or two per API process), when it is not database_url: behind PgBouncer in "
        "transaction mode, which does not carry LISTEN, a direct URL to the same database (same schema). Default: "
        "database_url.")
    public_base_url: str | None = Field(None, description="Base of output URLs; default http://host:port.")
    workers: int = Field(1, ge=0, description="In-process GPU workers for `serve` (0: API only).")
    api_keys: str | None = Field(None, description="Comma-separated key:secret pairs (or key: for key-only).")
    api_keys_file: Path | None = None
    allow_unauthenticated_public: bool = Field(
        False, description="Allow binding a non-loopback host with no API keys configured."
    )
    nonce_window_seconds: int = Field(
        3600, ge=1, description="With nonce_unit seconds, milliseconds or auto: a timestamp x-nonce further than "
        "this from the server's clock is refused (generous, as the seed's sample signs once and reuses its NONCE "
        "while a video runs). Also how long strict replay protection remembers a request."
    )
    nonce_unit: Literal["auto", "seconds", "milliseconds", "any"] = Field(
        "any", description="any (default): any decimal integer x-nonce with a right signature is accepted, as Wiro "
        "documents ('unix time or any random integer value'). Opt-in hardening: seconds, milliseconds or auto "
        "(seconds, or ms from 10**11 on) read it as unix time and refuse one outside nonce_window_seconds; this "
        "refuses clients that send random integers or reuse a nonce for longer than the window."
    )
    replay_protection: bool = Field(
        False,
        description="Strict mode (opt-in): refuse a request identical (API key, nonce, method, path, body) to one "
        "seen within nonce_window_seconds. Distinct requests sharing a nonce (the official client's parallel "
        "calls, the seed's reused NONCE) still pass; an identical poll repeated with one NONCE does not.",
    )
    allow_private_urls: bool = Field(False, description="Allow image/callback URLs to private addresses.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    fetch_timeout_seconds: float = Field(20.0, gt=0)
    max_queue_length: int = Field(1000, ge=1)
    request_loras: bool = Field(
        False, description="Let a Run add LoRAs of its own (`loras`: URL and strength) on a tool that takes them (the "
        "default tool, and catalogue tools with request_loras = true); off: a Run sending `loras` is refused (code 0)."
    )
    request_lora_hosts: str | None = Field(
        None, description="Comma-separated hosts request LoRAs (and every redirect) may come from: huggingface.co "
        "exactly, *.hf.co any subdomain (e.g. 'huggingface.co,*.hf.co'); needed with request_loras."
    )
    request_lora_max_count: int = Field(2, ge=1, le=16, description="Most LoRAs one request may add.")
    request_lora_max_bytes: int = Field(
        1024**3, ge=1024, description="Largest request LoRA file downloaded; a bigger one fails its task."
    )
    request_lora_cache_bytes: int = Field(
        10 * 1024**3, ge=1024, description="The workers' disk cache of request LoRAs (by content hash), held to this "
        "size by evicting the least recently used files no running task holds."
    )
    request_lora_cache_dir: Path | None = Field(None, description="Default: data_dir/request-loras.")
    request_lora_timeout_seconds: float = Field(600.0, gt=0, description="Longest one request LoRA download may take.")
    max_active_tasks_per_key: int = Field(
        0, ge=0, description="Most tasks one API key may have between task_queue and a terminal status (0: no "
        "limit); a Run over it gets error code 96, as on Wiro. Counted in the task store: it holds across API "
        "replicas. Without API keys there is no key to count by."
    )
    rate_limit_per_minute: int = Field(
        0, ge=0, description="Requests one API key (with no keys: one client address) may make per minute to one "
        "API process (0: no limit); over it: error code 96. Counted where rate_limit_storage says."
    )
    rate_limit_storage: str = Field(
        "memory://", description="Where rate limits are counted: memory:// (this API process; N replicas allow N x "
        "the limit) or a Redis URL (redis://host:6379/0, rediss://..., redis+unix://...) that every replica shares, "
        "so the limit holds for the fleet. Redis down: requests are let through uncounted (fail open), logged once "
        "per outage, in /metrics."
    )
    rate_limit_key_prefix: str = Field(
        "particalize", min_length=1, description="Prefix of the rate limit keys in a shared storage (two deployments "
        "sharing one Redis give each its own)."
    )
    storage_url: str | None = Field(
        None, description="fsspec URL of the outputs (file:///shared/outputs, s3://bucket/prefix, ...); "
        "default the local data_dir/outputs."
    )
    storage_options: str | None = Field(
        None, description="JSON object of fsspec options for storage_url (endpoint_url, key, secret, ...)."
    )
    min_free_disk_bytes: int = Field(
        1024**3, ge=0, description="A worker refuses to write an output when less than this is free where it writes."
    )
    # Sized from the measured model (docs/scale-out.md, "Stopping"): a 720P, 81-frame, 30-step video with CFG
    # is ~26 s a step on an H100 (two 720P forwards of ~13 s), ~13 min in all, plus load and decode: 20 min.
    shutdown_grace_seconds: float = Field(
        1200.0, ge=0, description="On SIGTERM a worker finishes its running task if it can within this time, "
        "otherwise puts it back in the queue (if it is still denoising); then exits 0."
    )
    shutdown_finish_seconds: float = Field(
        120.0, ge=0, description="A task whose denoising has finished when the grace period ends is still decoded, "
        "stored and recorded within this much more (a 720P VAE decode, MP4 encode and upload take ~10-60 s)."
    )
    requeue_limit: int = Field(1, ge=0, description="How often a task orphaned by a dead worker is requeued.")
    lease_seconds: float = Field(60.0, gt=0)
    callback_attempts: int = Field(5, ge=1, description="Deliveries tried per callbackUrl before giving up.")
    callback_backoff_seconds: float = Field(
        1.0, ge=0, description="First wait between callback attempts; doubles after each failure."
    )
    callback_timeout_seconds: float = Field(10.0, gt=0, description="Timeout of one callback POST.")
    node_name: str = Field(
        default_factory=socket.gethostname,
        description="This machine's name in worker ids (<node>/gpu<N>); unique per machine sharing a database.",
    )
    worker_poll_seconds: float = Field(
        0.05, gt=0, description="How often an idle worker looks for a queued task when nothing wakes it (a worker "
        "on SQLite that serve did not start; any worker while its wake-ups are down)."
    )
    worker_safety_poll_seconds: float = Field(
        5.0, gt=0, description="With wake-ups (PostgreSQL's LISTEN/NOTIFY, or serve's own workers on SQLite): how "
        "often an idle worker still looks for a queued task, and a running one reads its kill flag, by itself "
        "(covers a lost notification)."
    )
    progress_interval_seconds: float = Field(
        0.25, ge=0, description="Least time between two progress (task_output) writes of a running task."
    )
    worker_cpu_threads: int = Field(
        0, ge=0, description="torch CPU threads of a worker on CPU (0: all cores but one, leaving one for the API)."
    )
    cost_per_second: float = Field(0.0, ge=0, description="`cps` of a task; totalcost = cps x elapsed seconds.")
    access_log: bool = Field(True, description="Log one line per HTTP request (uvicorn's access log).")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line (time, level, logger, message, task_id)."
    )

    @field_validator("rate_limit_storage")
    @classmethod
    def _rate_limit_storage_known(cls, value: str) -> str:
        from server.rate_limit_storage import check_storage_url

        try:
            return check_storage_url(value.strip())
        except ValueError as exc:
            raise ValueError(f"PARTICALIZE_RATE_LIMIT_STORAGE: {exc}") from None

    @field_validator("lora_path", "api_keys_file", "tools_file", "request_lora_cache_dir", "database_listen_url",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("transformer_file", "text_encoder_file", mode="before")
    @classmethod
    def _weight_file_parses(cls, value: object, info: Any) -> object:
        from weights.single_file import parse_file_source

        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        try:
            parse_file_source(str(value))
        except ValueError as exc:
            raise ValueError(f"PARTICALIZE_{info.field_name.upper()}: {exc}") from None
        return str(value).strip()

    @field_validator("loras", "speed_lora")
    @classmethod
    def _lora_list_parses(cls, value: str | None, info: Any) -> str | None:
        from weights.lora_sources import parse_lora_list

        try:
            entries = parse_lora_list(value)
        except ValueError as exc:
            raise ValueError(f"PARTICALIZE_{info.field_name.upper()}: {exc}") from None
        if info.field_name == "speed_lora" and len(entries) > 1:
            raise ValueError("PARTICALIZE_SPEED_LORA takes one LoRA, not a list")
        return value

    @model_validator(mode="after")
    def _fast_mode_has_a_speed_lora(self) -> Settings:
        if self.mode == "fast" and not self.speed_lora:
            raise ValueError("PARTICALIZE_MODE=fast needs a step-distilled LoRA: set PARTICALIZE_SPEED_LORA "
                             "(see weights/README.md)")
        if self.mode == "cached" and self.step_cache != "mag":
            raise ValueError("PARTICALIZE_MODE=cached needs the MagCache step cache: set PARTICALIZE_STEP_CACHE=mag "
                             "(--step-cache mag)")
        return self

    @model_validator(mode="after")
    def _request_loras_have_hosts(self) -> Settings:
        if self.request_loras and not self.request_lora_host_list:
            raise ValueError("PARTICALIZE_REQUEST_LORAS=1 needs the hosts request LoRAs may come from: set "
                             "PARTICALIZE_REQUEST_LORA_HOSTS (e.g. huggingface.co,*.hf.co)")
        if self.request_lora_cache_bytes < self.request_lora_max_bytes:
            raise ValueError("PARTICALIZE_REQUEST_LORA_CACHE_BYTES must be at least PARTICALIZE_REQUEST_LORA_MAX_BYTES "
                             "(the cache holds the largest file a request may send)")
        return self

    @property
    def request_lora_host_list(self) -> tuple[str, ...]:
        return tuple(host.strip() for host in (self.request_lora_hosts or "").split(",") if host.strip())

    @field_validator("storage_options")
    @classmethod
    def _storage_options_is_a_json_object(cls, value: str | None) -> str | None:
        parse_json_object(value, "PARTICALIZE_STORAGE_OPTIONS")
        return value

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'particalize.db').resolve()}"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    def with_overrides(self, **overrides: object) -> Settings:
        """CLI flags win over the environment; None means 'flag not given'. What was set (in the environment, by
        a flag) stays marked as set in `model_fields_set`, so a setting equal to its default still counts as the
        operator's choice (see cli_server.tiny_limits)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        updated = self.model_validate({**self.model_dump(), **given})
        updated.__pydantic_fields_set__ = self.model_fields_set | set(given)
        return updated
