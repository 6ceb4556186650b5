"""The one typed settings object: environment (PARTICALIZE_*), then CLI flags on top."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".cache" / "particalize"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARTICALIZE_", env_file=None, extra="ignore")

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
    device: Literal["auto", "cuda", "cpu"] = "auto"
    hf_token: str | None = Field(None, description="Token for gated or private hub repos (fetch only).")

    # --- request limits ------------------------------------------------------------------------
    max_num_frames: int = Field(161, ge=1)
    max_steps: int = Field(100, ge=1)
    max_side: int = Field(1920, ge=16)
    max_pixels: int = Field(1280 * 720, ge=256)

    # --- server --------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Field(default_factory=lambda: Path("data"))
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir.")
    public_base_url: str | None = Field(None, description="Base of output URLs; default http://host:port.")
    workers: int = Field(1, ge=0, description="In-process GPU workers for `serve` (0: API only).")
    api_keys: str | None = Field(None, description="Comma-separated key:secret pairs (or key: for key-only).")
    api_keys_file: Path | None = None
    allow_unauthenticated_public: bool = Field(
        False, description="Allow binding a non-loopback host with no API keys configured."
    )
    nonce_window_seconds: int = Field(300, ge=1)
    replay_protection: bool = Field(
        True,
        description="Refuse a (key, nonce) pair seen within nonce_window_seconds. The official client sends a "
        "fresh ms nonce per request; turn off for clients that reuse one NONCE, as the seed's shell sample does.",
    )
    allow_private_urls: bool = Field(False, description="Allow image/callback URLs to private addresses.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    fetch_timeout_seconds: float = Field(20.0, gt=0)
    max_queue_length: int = Field(1000, ge=1)
    requeue_limit: int = Field(1, ge=0, description="How often a task orphaned by a dead worker is requeued.")
    lease_seconds: float = Field(60.0, gt=0)
    callback_attempts: int = Field(5, ge=1)
    callback_backoff_seconds: float = Field(1.0, ge=0)

    @field_validator("lora_path", "api_keys_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'particalize.db').resolve()}"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    def with_overrides(self, **overrides: object) -> Settings:
        """CLI flags win over the environment; None means 'flag not given'."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.model_validate({**self.model_dump(), **given})
