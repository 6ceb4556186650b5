"""Reading tasks: by id or token (Task/Detail's hot path, on prebuilt Core statements), lists, outputs, and the
recorded events that live progress and the metrics follow. Nothing here writes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Integer, and_, bindparam, column, func, or_, select, values

from server.store.db import Database
from server.store.models import ACTIVE, Output, Task, TaskEvent
from server.store.raw_select import RawSelect, raw_read
from server.tool_info import DEFAULT_SLUG

_TASKS, _OUTPUTS = Task.__table__, Output.__table__
_TASK_BY_ID = select(_TASKS).where(_TASKS.c.id == bindparam("id"))
_TASK_BY_TOKEN = select(_TASKS).where(_TASKS.c.socketaccesstoken == bindparam("token"))
ACTIVE_OF_OWNER = select(func.count()).select_from(_TASKS).where(
    _TASKS.c.owner == bindparam("owner"), _TASKS.c.status.in_(ACTIVE))
"""How many of one API key's tasks are between task_queue and a terminal status (the per-key limit counts them)."""
_TOOL = func.coalesce(Task.request["tool"].as_string(), DEFAULT_SLUG)
"""A task's tool, read from its record in SQL (records stored before tools existed are the default tool's)."""
_OUTPUTS_OF_TASK = select(_OUTPUTS).where(_OUTPUTS.c.task_id == bindparam("task_id")).order_by(_OUTPUTS.c.name)


class TaskReads:
    def __init__(self, db: Database) -> None:
        self.db = db
        dialect = db.engine.dialect
        self._task_by_id = RawSelect("TaskRow", _TASK_BY_ID, dialect)
        self._task_by_token = RawSelect("TaskRow", _TASK_BY_TOKEN, dialect)
        self._outputs_of_task = RawSelect("OutputRow", _OUTPUTS_OF_TASK, dialect)
        self._begin = "BEGIN" if db.is_sqlite else None
        """SQLite's connections run in autocommit (server/store/db.py): the two reads get one snapshot by a BEGIN."""

    def get(self, task_id: int, owner: str | None = None) -> Task | None:
        with self.db.session() as s:
            task = s.get(Task, task_id)
        if task is None or (owner is not None and task.owner != owner):
            return None
        return task

    def find(self, taskid: str | None = None, token: str | None = None, owner: str | None = None) -> Any | None:
        """By id, by token, or by both (then both must match). Tasks of other API keys are not found.
        The answer is a row with the task's columns as attributes (read-only)."""
        found = self.find_with_outputs(taskid, token, owner, outputs=False)
        return found[0] if found else None

    def find_with_outputs(
        self, taskid: str | None = None, token: str | None = None, owner: str | None = None, outputs: bool = True
    ) -> tuple[Any, list[Any]] | None:
        """`find`, and the task's outputs read in the same transaction: Task/Detail's read, the hottest path
        (prebuilt statements run on the pool's DBAPI connection, server/store/raw_select.py; rows are named tuples
        with the columns as attributes)."""
        if taskid is not None:
            if not taskid.isdigit() or len(taskid) > 18:
                return None
            select_task, params = self._task_by_id, {"id": int(taskid)}
        elif token is not None:
            select_task, params = self._task_by_token, {"token": token}
        else:
            return None
        with raw_read(self.db.engine, self._begin) as cursor:
            found = select_task.rows(cursor, params)
            task = found[0] if found else None
            if task is None or (token is not None and task.socketaccesstoken != token):
                return None
            if owner is not None and task.owner != owner:
                return None
            if not outputs:
                return task, []
            return task, self._outputs_of_task.rows(cursor, {"task_id": task.id})

    def list(
        self, owner: str | None = None, start: int = 0, limit: int = 20, *, ascending: bool = False,
        tools: Sequence[str] | None = None,
    ) -> tuple[int, list[Task]]:
        """Newest first (oldest first when `ascending`); only the tasks of `tools` (slugs as the records hold them)
        when given (a record without a tool is the default tool's)."""
        with self.db.session() as s:
            where = [] if owner is None else [Task.owner == owner]
            if tools is not None:
                where.append(_TOOL.in_(list(tools)))
            total = s.scalar(select(func.count()).select_from(Task).where(*where)) or 0
            order = Task.id.asc() if ascending else Task.id.desc()
            rows = s.scalars(select(Task).where(*where).order_by(order).offset(start).limit(limit))
            return total, list(rows)

    def outputs(self, task_ids: Iterable[int]) -> dict[int, list[Output]]:
        ids = list(task_ids)
        found: dict[int, list[Output]] = {i: [] for i in ids}
        if not ids:
            return found
        with self.db.session() as s:
            for out in s.scalars(select(Output).where(Output.task_id.in_(ids)).order_by(Output.name)):
                found[out.task_id].append(out)
        return found

    def count(self, status: str | None = None) -> int:
        with self.db.session() as s:
            stmt = select(func.count()).select_from(Task)
            if status is not None:
                stmt = stmt.where(Task.status == status)
            return s.scalar(stmt) or 0

    def active_count(self, owner: str) -> int:
        """How many of `owner`'s tasks are between task_queue and a terminal status."""
        with self.db.session() as s:
            return s.scalar(ACTIVE_OF_OWNER, {"owner": owner}) or 0

    def status_counts(self) -> dict[tuple[str, str, str], int]:
        """How many tasks are in each (status, pexit, tool) now: one grouped count, for metrics at scrape time (the
        tool as the records hold it; a record without one is the default tool's)."""
        with self.db.session() as s:
            tool = _TOOL.label("tool")  # grouped by its name: PostgreSQL would see two expressions (bound params)
            rows = s.execute(select(Task.status, Task.pexit, tool, func.count()).group_by(Task.status, Task.pexit,
                                                                                         tool))
            return {(status, pexit, tool): count for status, pexit, tool, count in rows}

    def tools_of(self, task_ids: Iterable[int]) -> dict[int, str]:
        """The tool of each task still stored (the metrics label the events they read by it)."""
        ids = list(task_ids)
        if not ids:
            return {}
        with self.db.session() as s:
            return {task_id: tool for task_id, tool in s.execute(select(Task.id, _TOOL).where(Task.id.in_(ids)))}

    def events(self, task_id: int, after_id: int = 0) -> list[TaskEvent]:
        """One task's events newer than `after_id`, in order (all of them by default): what a live follower has
        not sent yet. One worker writes a task's events one committed transaction at a time, so ids never go back."""
        with self.db.session() as s:
            stmt = select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.id > after_id)
            return list(s.scalars(stmt.order_by(TaskEvent.id)))

    def events_after(self, after_id: int, limit: int, also_ids: Iterable[int] = ()) -> list[TaskEvent]:
        """All tasks' events newer than `after_id` (at most `limit`), plus any of `also_ids` (ids a reader
        saw skipped, which a slower transaction may have committed since), in id order."""
        wanted = TaskEvent.id > after_id
        extra = list(also_ids)
        if extra:
            wanted = or_(wanted, TaskEvent.id.in_(extra))
        with self.db.session() as s:
            return list(s.scalars(select(TaskEvent).where(wanted).order_by(TaskEvent.id).limit(limit)))

    def events_since(self, cursors: dict[int, int], limit: int) -> list[TaskEvent]:
        """The events of each task in `cursors` newer than the id given for it, in id order (at most `limit`: then
        what is answered is, for each task, the oldest of its new events): what the live followers of several tasks
        have not got yet, in one query. A task's ids never go back (see `events`)."""
        after = values(column("task_id", Integer), column("after", Integer), name="cursors").data(
            list(cursors.items())).cte("cursors")
        stmt = select(TaskEvent).join(after, and_(TaskEvent.task_id == after.c.task_id, TaskEvent.id > after.c.after))
        with self.db.session() as s:
            return list(s.scalars(stmt.order_by(TaskEvent.id).limit(limit)))
