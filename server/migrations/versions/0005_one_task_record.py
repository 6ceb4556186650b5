"""One read path for tasks: every task has its typed record (the `request` JSON column), and the columns that
shadowed it go.

Tasks stored before revision 0004 have no record, only the columns Run wrote then: `parameters` (the Wiro
parameters as recorded: the inputs as sent with the defaults and the chosen seed filled in, which Run had
validated), `image_url`, `upload_id`, `callbackurl` and `owner`. Their record is built here from those columns, as
`server.task_record` read them until now: the recorded parameters are its inputs (they hold every default already,
so the task answers the same `parameters`) and, in their text form, its parameters (validated when the record is
read, as they were). Then `parameters`, `image_url`, `upload_id` and `callbackurl` are dropped; `owner` stays, copied
from the record once when a task is made, because List and the per-key limit seek it through its indexes.

On SQLite the columns are dropped with ALTER TABLE ... DROP COLUMN (SQLite 3.35 or newer): recreating the table,
as a batch operation would, drops the old one, and with foreign keys on that deletes every task's events and
outputs (ON DELETE CASCADE). For the same reason `request` stays nullable in the schema; every row has one.

Processes of an older version read the dropped columns: stop them before one of this version upgrades the
database. The downgrade puts the columns back, filled from the records.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_CHUNK = 500
_TASKS = sa.table(
    "tasks", sa.column("id", sa.Integer), sa.column("owner", sa.String), sa.column("request", sa.JSON),
    sa.column("parameters", sa.Text), sa.column("image_url", sa.Text), sa.column("upload_id", sa.String),
    sa.column("callbackurl", sa.Text),
)
_SHADOWS = ("parameters", "image_url", "upload_id", "callbackurl")


def _record(parameters: str | None, image_url: str | None, upload_id: str | None, callbackurl: str | None,
            owner: str | None) -> dict[str, Any]:
    """A pre-0004 task's record (server.task_record.TaskRecord as JSON) from its columns."""
    try:
        recorded = json.loads(parameters or "{}")
    except ValueError:
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    inputs = {str(name): str(value) for name, value in recorded.items()}
    return {"params": inputs, "inputs": inputs,
            "image": {"url": image_url or "", "upload_id": upload_id, "attached": False},
            "callback_url": callbackurl or "", "owner": owner, "resolved": None}


def _fill_records(conn: sa.Connection) -> None:
    """The record of every task stored without one, a chunk at a time."""
    last = 0
    update = (_TASKS.update().where(_TASKS.c.id == sa.bindparam("task_id"))
              .values(request=sa.bindparam("record", type_=sa.JSON)))
    while True:
        rows = conn.execute(
            sa.select(_TASKS.c.id, _TASKS.c.parameters, _TASKS.c.image_url, _TASKS.c.upload_id, _TASKS.c.callbackurl,
                      _TASKS.c.owner)
            .where(_TASKS.c.request.is_(None), _TASKS.c.id > last).order_by(_TASKS.c.id).limit(_CHUNK)).all()
        if not rows:
            return
        conn.execute(update, [{"task_id": row.id, "record": _record(row.parameters, row.image_url, row.upload_id,
                                                                     row.callbackurl, row.owner)} for row in rows])
        last = rows[-1].id


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
        raise RuntimeError(f"migration 0005 drops columns with ALTER TABLE DROP COLUMN, which needs SQLite 3.35 or "
                           f"newer; this Python has SQLite {sqlite3.sqlite_version}")
    _fill_records(conn)
    for name in _SHADOWS:
        op.drop_column("tasks", name)


def downgrade() -> None:
    op.add_column("tasks", sa.Column("parameters", sa.Text(), nullable=False, server_default="{}"))
    op.add_column("tasks", sa.Column("image_url", sa.Text(), nullable=True))
    op.add_column("tasks", sa.Column("upload_id", sa.String(32), nullable=True))
    op.add_column("tasks", sa.Column("callbackurl", sa.Text(), nullable=False, server_default=""))
    conn = op.get_bind()
    update = (_TASKS.update().where(_TASKS.c.id == sa.bindparam("task_id"))
              .values(parameters=sa.bindparam("p"), image_url=sa.bindparam("url"), upload_id=sa.bindparam("upload"),
                      callbackurl=sa.bindparam("callback")))
    last = 0
    while True:  # revision 0004 reads the record; older versions read these (the inputs stand for the parameters)
        rows = conn.execute(sa.select(_TASKS.c.id, _TASKS.c.request).where(_TASKS.c.id > last)
                            .order_by(_TASKS.c.id).limit(_CHUNK)).all()
        if not rows:
            return
        values = []
        for row in rows:
            record = row.request or {}
            image = record.get("image") or {}
            values.append({"task_id": row.id, "p": json.dumps(record.get("inputs") or {}), "url": image.get("url"),
                           "upload": image.get("upload_id"), "callback": record.get("callback_url") or ""})
        conn.execute(update, values)
        last = rows[-1].id
