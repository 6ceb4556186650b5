"""A task as Wiro answers it: every field of the published TASK, numbers as strings, "0" for times not
reached. Field order follows the published Kill/Cancel answers; `modeldescription`, `modelslugowner` and
`modelslugproject` (newer Wiro docs, shown by the official client) come last."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy.engine import Row

from server.progress import progress_text
from server.storage import Storage
from server.store.models import CANCEL, POSTPROCESS_END, QUEUED, Output, Task
from server.task_record import record_of, recorded_of, used_of
from server.tool_info import CATEGORIES_TEXT, Catalogue


def _time(value: float) -> str:
    return str(int(value)) if value else "0"


def _money(value: float) -> str:
    return f"{value:.12f}" if value else "0"


def elapsed_seconds(task: TaskLike, now: float | None = None) -> float:
    """Seconds from acceptance to the end of inference (or to the end of the task, or now while it runs)."""
    if not task.accepttime or task.status == QUEUED:
        return 0.0
    end = task.endtime or (task.canceltime if task.status == CANCEL else 0.0)
    if not end and task.status == POSTPROCESS_END:
        end = task.postprocessendtime
    if not end:
        end = time.time() if now is None else now
    return max(0.0, end - task.accepttime)


def debug_output(task: TaskLike) -> str:
    """The progress while it is the latest news (rendered from its numbers), else the text last recorded."""
    if task.progress_step is not None and task.progress_total is not None:
        return progress_text(task.progress_step, task.progress_total, task.progress_elapsed or 0.0)
    return task.debugoutput


TaskLike = Task | Row
"""An ORM task, or a row of the tasks table (the Detail path reads rows): both have the columns as attributes."""
OutputLike = Output | Row


def output_dict(out: OutputLike, task: TaskLike, storage: Storage) -> dict[str, Any]:
    return {
        "id": out.id,
        "name": out.name,
        "contenttype": out.contenttype,
        "parentid": out.parentid,
        "uuid": task.uuid,
        "size": str(out.size),
        "addedtime": _time(out.addedtime),
        "modifiedtime": _time(out.modifiedtime),
        "accesskey": out.accesskey,
        "foldercount": "0",
        "filecount": "0",
        "ispublic": 0,
        "expiretime": None,
        "url": storage.url_of(out.path),
    }


def task_dict(task: TaskLike, outputs: list[OutputLike], storage: Storage, cps: float,
              catalogue: Catalogue | None = None) -> dict[str, Any]:
    """One TASK; its model fields name the tool the record names (described from `catalogue` while it still
    serves it)."""
    record = record_of(task)
    owner, _, project = record.tool.partition("/")
    tool = (catalogue or Catalogue()).find(owner, project)
    return {
        "id": str(task.id),
        "uuid": task.uuid,
        "name": "",
        "socketaccesstoken": task.socketaccesstoken,
        "parameters": {**record.wiro_parameters(used_of(task)), **recorded_of(task)},
        "debugoutput": debug_output(task),
        "debugerror": task.debugerror,
        "starttime": _time(task.starttime),
        "endtime": _time(task.endtime),
        "elapsedseconds": f"{elapsed_seconds(task):.4f}",
        "status": task.status,
        "cps": _money(cps),
        "totalcost": _money(task.totalcost),
        "guestid": None,
        "projectid": "0",
        "modelid": "1",
        "description": "",
        "basemodelid": "0",
        "runtype": "model",
        "modelfolderid": "",
        "modelfileid": "",
        "callbackurl": record.callback_url,
        "marketplaceid": None,
        "createtime": _time(task.createtime),
        "canceltime": _time(task.canceltime),
        "assigntime": _time(task.assigntime),
        "accepttime": _time(task.accepttime),
        "preprocessstarttime": _time(task.preprocessstarttime),
        "preprocessendtime": _time(task.preprocessendtime),
        "postprocessstarttime": _time(task.postprocessstarttime),
        "postprocessendtime": _time(task.postprocessendtime),
        "pexit": task.pexit,
        "categories": CATEGORIES_TEXT if tool is None else json.dumps(list(tool.categories)),
        "outputs": [output_dict(o, task, storage) for o in outputs],
        "size": str(sum(o.size for o in outputs)),
        "modeldescription": "" if tool is None else tool.description,
        "modelslugowner": owner,
        "modelslugproject": project,
    }
