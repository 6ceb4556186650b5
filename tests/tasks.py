"""Queue a task straight in the store, from Wiro fields as a client sends them (what Run would record, without
its URL checks)."""

from __future__ import annotations

from typing import Any

from pipeline.params import GenerationParams
from server.store import NewUpload, Store
from server.store.models import Task
from server.task_record import ImageSource, TaskRecord


def create_task(store: Store, *, parameters: dict[str, str], image_url: str, new_upload: NewUpload | None = None,
                callback_url: str = "", owner: str | None = None) -> Task:
    record = TaskRecord(params=GenerationParams.model_validate(parameters), inputs=dict(parameters),
                        image=ImageSource(url=image_url, upload_id=new_upload.id if new_upload else None),
                        callback_url=callback_url, owner=owner)
    return store.tasks.create(record, new_upload)


def as_sent(**fields: Any) -> dict[str, str]:
    return {k: str(v) for k, v in fields.items()}
