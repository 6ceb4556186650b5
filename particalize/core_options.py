"""The server core's typed options, built from the one Settings object: what the task store, Run's validation, a
worker and the worker processes `serve` starts are told. The entry points build them once and hand them down;
nothing below this layer reads Settings."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from particalize import __version__
from particalize.compose import limits
from particalize.settings import Settings
from server.limits import RequestLoraOptions
from server.processes.supervisor import WorkerProcessOptions
from server.store import StoreOptions
from server.worker import FetchOptions, Generator, WorkerOptions

if TYPE_CHECKING:
    from collections.abc import Callable

    from server.storage import Storage
    from server.worker.ranks import RankJob

log = logging.getLogger("particalize.worker")

SETTINGS_ENV = "_PARTICALIZE_WORKER_SETTINGS"
"""The serve process's settings (JSON), for the workers it starts: flags given to serve reach them too."""
_SECRETS = {"api_keys", "api_keys_file", "hf_token"}


def store_options(settings: Settings) -> StoreOptions:
    return StoreOptions(
        url=settings.sqlalchemy_url,
        listen_url=settings.database_listen_url,
        lease_seconds=settings.lease_seconds,
        requeue_limit=settings.requeue_limit,
        max_queue_length=settings.max_queue_length,
        max_active_per_key=settings.max_active_tasks_per_key,
        callback_attempts=settings.callback_attempts,
        callback_backoff_seconds=settings.callback_backoff_seconds,
    )


def request_lora_options(settings: Settings) -> RequestLoraOptions:
    """Request LoRAs: whether Run takes them and from where, and how the workers download and cache them."""
    return RequestLoraOptions(
        enabled=settings.request_loras,
        hosts=settings.request_lora_host_list,
        max_count=settings.request_lora_max_count,
        max_bytes=settings.request_lora_max_bytes,
        cache_dir=(settings.request_lora_cache_dir or settings.data_dir / "request-loras").resolve(),
        cache_bytes=settings.request_lora_cache_bytes,
        timeout_seconds=settings.request_lora_timeout_seconds,
        allow_private_urls=settings.allow_private_urls,
    )


def worker_options(settings: Settings) -> WorkerOptions:
    return WorkerOptions(
        node_name=settings.node_name,
        model=settings.model,
        version=__version__,
        store=store_options(settings),
        limits=limits(settings),
        fetch=FetchOptions(max_image_bytes=settings.max_image_bytes, timeout_seconds=settings.fetch_timeout_seconds,
                           allow_private_urls=settings.allow_private_urls),
        request_loras=request_lora_options(settings),
        poll_seconds=settings.worker_poll_seconds,
        safety_poll_seconds=settings.worker_safety_poll_seconds,
        progress_interval_seconds=settings.progress_interval_seconds,
        shutdown_finish_seconds=settings.shutdown_finish_seconds,
        min_free_disk_bytes=settings.min_free_disk_bytes,
        cost_per_second=settings.cost_per_second,
    )


def worker_process_options(settings: Settings) -> WorkerProcessOptions:
    """The workers `serve` starts: `settings.workers` of them, each configured with these settings."""
    data = settings.model_dump(mode="json", exclude=_SECRETS)
    data["data_dir"] = str(settings.data_dir.resolve())
    data["database_url"] = settings.sqlalchemy_url
    return WorkerProcessOptions(count=settings.workers, grace_seconds=settings.shutdown_grace_seconds,
                                gpus_per_worker=settings.parallel_degree if settings.context_parallel != "none" else 1,
                                finish_seconds=settings.shutdown_finish_seconds,
                                child_env={SETTINGS_ENV: json.dumps(data)},
                                wake_pipes=settings.sqlalchemy_url.startswith("sqlite"))


def settings_given_by_serve() -> Settings | None:
    """In a worker `serve` started: the settings it was given (taken out of the environment); else None."""
    given = os.environ.pop(SETTINGS_ENV, None)
    return Settings.model_validate_json(given) if given else None


@dataclass(frozen=True)
class GeneratorFactory:
    """Builds the warm model the settings describe, in the worker process (a plain object: it pickles)."""

    settings: Settings

    def __call__(self) -> Generator:
        from particalize.compose import make_generator

        self._set_cpu_threads()
        return make_generator(self.settings)

    def _set_cpu_threads(self) -> None:
        """On CPU, leave one core to the API process (unless told otherwise)."""
        import torch

        from pipeline.devices import pick_device

        if pick_device(self.settings.device).type != "cpu":
            return
        threads = self.settings.worker_cpu_threads or max(1, (os.cpu_count() or 2) - 1)
        torch.set_num_threads(threads)
        log.info("worker uses %d CPU thread(s) for torch", threads)


def rank_job(settings: Settings, slot: int, make_storage: Callable[[], Storage]) -> RankJob:
    """What each rank of a context-parallel worker is built from (`make_storage` pickles: it is called in rank 0);
    on the CPU the worker's threads are shared out between the ranks."""
    from pipeline.devices import pick_device
    from server.worker.ranks import RankJob

    device_type = pick_device(settings.device).type
    if device_type == "cpu" and not settings.worker_cpu_threads:
        threads = max(1, ((os.cpu_count() or 2) - 1) // settings.parallel_degree)
        settings = settings.with_overrides(worker_cpu_threads=threads)
    return RankJob(mode=settings.context_parallel, degree=settings.parallel_degree, device_type=device_type,
                   timeout_seconds=settings.parallel_timeout_seconds, grace_seconds=settings.shutdown_grace_seconds,
                   options=worker_options(settings), make_storage=make_storage,
                   make_generator=GeneratorFactory(settings), slot=slot)
