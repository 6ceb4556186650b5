"""The composition root of the HTTP side: the server's options, its services and the app, built once from the
settings (server/ never sees them). Kept apart from particalize.compose so that `generate` never imports the web
stack."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from particalize.compose import fast_mode, limits, modes
from particalize.core_options import request_lora_options
from particalize.settings import Settings, parse_json_object
from particalize.tools import tool_set
from server.app import create_app
from server.auth import Authenticator, AuthOptions, load_api_keys
from server.callbacks import CallbackOptions
from server.limits import RequestLimits
from server.options import ServerOptions
from server.services import Services
from server.storage import Storage, StorageOptions
from server.tool_info import ToolOptions

if TYPE_CHECKING:
    from server.processes.supervisor import WorkerProcesses
    from server.worker_reports import WorkerReports


def public_base_url(settings: Settings) -> str:
    """PARTICALIZE_PUBLIC_BASE_URL, or http://host:port of this server (its node name when it listens on all
    interfaces)."""
    if settings.public_base_url:
        return str(settings.public_base_url).rstrip("/")
    host = settings.host
    if host in ("", "0.0.0.0", "::"):
        host = settings.node_name
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def storage_options(settings: Settings) -> StorageOptions:
    return StorageOptions(
        url=settings.storage_url or str(Path(settings.outputs_dir).resolve()),
        base_url=public_base_url(settings),
        options=parse_json_object(settings.storage_options, "PARTICALIZE_STORAGE_OPTIONS"),
    )


def open_storage(settings: Settings) -> Storage:
    return Storage(storage_options(settings))


def auth_options(settings: Settings) -> AuthOptions:
    """The API keys (the keys file is read now) and the nonce rules; ValueError for a malformed entry."""
    return AuthOptions(
        keys=load_api_keys(settings.api_keys, settings.api_keys_file),
        nonce_window_seconds=settings.nonce_window_seconds,
        nonce_unit=settings.nonce_unit,
        replay_protection=settings.replay_protection,
    )


def request_limits(settings: Settings) -> RequestLimits:
    return RequestLimits(
        params=limits(settings),
        modes=modes(settings),
        max_body_bytes=settings.max_body_bytes,
        max_image_bytes=settings.max_image_bytes,
        fetch_timeout_seconds=settings.fetch_timeout_seconds,
        allow_private_urls=settings.allow_private_urls,
        request_loras=request_lora_options(settings),
    )


def server_options(settings: Settings) -> ServerOptions:
    return ServerOptions(
        storage=storage_options(settings),
        auth=auth_options(settings),
        limits=request_limits(settings),
        tool=ToolOptions(model=settings.model, fast=fast_mode(settings), default_mode=settings.mode,
                         cost_per_second=settings.cost_per_second, catalogue=tool_set(settings).catalogue),
        callbacks=CallbackOptions(timeout_seconds=settings.callback_timeout_seconds,
                                  allow_private_urls=settings.allow_private_urls),
        rate_limit_per_minute=settings.rate_limit_per_minute,
        rate_limit_storage=settings.rate_limit_storage,
        rate_limit_key_prefix=settings.rate_limit_key_prefix,
    )


def open_services(settings: Settings, options: ServerOptions | None = None) -> Services:
    """Connect to the database, bring its schema up to date (Alembic), and open what the routes share."""
    from particalize.core_options import store_options
    from server.store import Database, DbNonceStore, Store, upgrade

    options = options or server_options(settings)
    db = Database(settings.sqlalchemy_url, settings.database_listen_url)
    upgrade(db)
    return Services(options, Store(db, store_options(settings)), Storage(options.storage),
                    Authenticator(options.auth, DbNonceStore(db)))


def build_app(settings: Settings, *, services: Services | None = None) -> FastAPI:
    """The app the settings describe, with `settings.workers` worker processes of its own. `services`: already
    open (the caller closes them), instead of opening the settings' at start."""
    options = server_options(settings)

    def start_workers(reports: WorkerReports) -> WorkerProcesses:
        from particalize.core_options import worker_process_options
        from server.processes.supervisor import WorkerProcesses

        return WorkerProcesses(worker_process_options(settings), reports=reports).start()

    return create_app(
        options,
        (lambda: services) if services is not None else (lambda: open_services(settings, options)),
        close_services=services is None,
        start_workers=start_workers if settings.workers > 0 else None,
    )
