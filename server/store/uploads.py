"""Uploaded input images (File/Upload, or a file sent with Run), kept in the database so that a worker on another
machine reads them through the only channel it shares with the API; and InputOutputDelete's removal of a task's
files."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, select

from server.store.db import Database
from server.store.ids import new_token
from server.store.models import Output, Upload


@dataclass(frozen=True)
class NewUpload:
    id: str
    name: str
    contenttype: str
    data: bytes


def upload_row(upload: NewUpload, owner: str | None, now: float, task_id: int | None = None) -> Upload:
    return Upload(
        id=upload.id, name=upload.name, contenttype=upload.contenttype, size=len(upload.data), data=upload.data,
        addedtime=now, accesskey=new_token(), owner=owner, task_id=task_id,
    )


class Uploads:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def add(self, upload: NewUpload, owner: str | None = None) -> Upload:
        with self.db.session(write=True) as s:
            row = upload_row(upload, owner, self.clock())
            s.add(row)
        return row

    def get(self, upload_id: str) -> Upload | None:
        with self.db.session() as s:
            return s.get(Upload, upload_id)

    def delete_task_files(self, task_id: int) -> list[str]:
        """Drop the output rows and the task's uploaded input; answers the output paths to remove."""
        with self.db.session(write=True) as s:
            paths = list(s.scalars(select(Output.path).where(Output.task_id == task_id)))
            s.execute(delete(Output).where(Output.task_id == task_id))
            s.execute(delete(Upload).where(Upload.task_id == task_id))
        return paths
