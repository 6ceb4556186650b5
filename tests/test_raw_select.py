"""Task/Detail's read on the pool's DBAPI connection (server/store/raw_select.py) answers what SQLAlchemy's own read
answers, on both backends, and its failures are SQLAlchemy's exceptions (so outages are still told from bugs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import bindparam, select
from sqlalchemy.exc import OperationalError

from server.store import Database, Store
from server.store.models import Output, Task
from server.store.outage import is_outage
from server.store.raw_select import RawSelect, raw_read
from server.store.reads import _OUTPUTS_OF_TASK, _TASK_BY_ID
from tests.conftest import make_settings
from tests.tasks import create_task


@pytest.fixture
def settings(tmp_path: Path, db_url: str):
    return make_settings(tmp_path, db_url)


def test_the_raw_read_answers_the_same_values_as_sqlalchemys_read(store: Store):
    task = create_task(store, parameters={"prompt": "p", "numFrames": "9"}, image_url="https://example.com/a.png")
    with store.db.session(write=True) as s:
        row = s.get(Task, task.id)
        row.kill_requested = True
        row.resolved = {"seed": 7, "recorded": {"computedSteps": 3}}
        row.progress_step, row.progress_total, row.progress_elapsed = 2, 9, 1.5
        row.totalcost = 0.25
        s.add(Output(id="o1", task_id=task.id, name="0.mp4", contenttype="video/mp4", parentid="p", size=123,
                     addedtime=1.5, modifiedtime=2.5, accesskey="k", path="x/0.mp4"))
    found = store.reads.find_with_outputs(str(task.id))
    assert found is not None
    raw_task, raw_outputs = found
    with store.db.connect() as conn:
        task_row = conn.execute(_TASK_BY_ID, {"id": task.id}).one()
        output_rows = list(conn.execute(_OUTPUTS_OF_TASK, {"task_id": task.id}))
    assert raw_task._asdict() == task_row._asdict()
    assert [o._asdict() for o in raw_outputs] == [o._asdict() for o in output_rows]
    assert raw_task.kill_requested is True, "SQLite's 0/1 comes back a bool, as through SQLAlchemy"
    assert raw_task.resolved == {"seed": 7, "recorded": {"computedSteps": 3}}
    assert store.reads.find_with_outputs(None, task.socketaccesstoken)[0].id == task.id
    assert store.reads.find_with_outputs(str(task.id), owner="someone else") is None


def test_a_statement_whose_parameters_sqlalchemy_would_process_is_refused(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ValueError, match="given at execution"):
        RawSelect("Row", select(Task.id).where(Task.id == 5), db.engine.dialect)
    assert RawSelect("Row", select(Task.id).where(Task.id == bindparam("id")), db.engine.dialect).keys == {"id"}
    db.dispose()


def test_a_driver_error_is_raised_as_sqlalchemys_exception(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'empty.db'}")  # not migrated: no tasks table
    query = RawSelect("Row", _TASK_BY_ID, db.engine.dialect)
    with pytest.raises(OperationalError) as caught, raw_read(db.engine, "BEGIN") as cursor:
        query.rows(cursor, {"id": 1})
    assert "no such table" in str(caught.value.orig)
    assert is_outage(caught.value), "an OperationalError is what the API answers 503 to"
    db.dispose()
