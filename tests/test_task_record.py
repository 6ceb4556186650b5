"""The typed task record, progress as numbers and the outcome table: rows stored before revision 0004 are given
their record by migration 0005 and still read and run; Detail's debugoutput is rendered from the progress numbers
until other news replaces them; the recorded parameters are the inputs as sent plus defaults and what the worker
resolved; every way a run ends has one row."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from sqlalchemy import JSON, bindparam, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError

from particalize.compose_server import open_storage
from particalize.core_options import worker_options
from pipeline.params import GenerationParams
from server.progress import progress_text
from server.store import Database, Store, TaskKilled, TaskLost, upgrade
from server.store.models import OUTPUT
from server.task_record import ImageSource, TaskRecord, parameters_of, record_of
from server.task_view import debug_output
from server.worker import Worker
from server.worker.outcomes import HANDLING, Outcome, TaskEnd, ending_of
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.tasks import create_task
from tests.test_worker import IMAGE_URL, SMALL, WORKER, FakeFetch

LEGACY_SENT = {"inputImageUrl": IMAGE_URL, **SMALL, "scale": "4", "prompt": "a cat"}
LEGACY_PARAMETERS = {**LEGACY_SENT, **{name: str(value) for name, value in
                                        GenerationParams.model_validate(LEGACY_SENT).wiro_inputs().items()
                                        if value is not None and name not in LEGACY_SENT}}
"""What Run stored in `parameters` before revision 0004: the inputs as sent, then every default filled in."""
_TASK_COLUMNS_0004 = (
    "id, uuid, socketaccesstoken, owner, status, parameters, image_url, upload_id, callbackurl, debugoutput, "
    "debugerror, pexit, totalcost, kill_requested, createtime, accepttime, preprocessstarttime, preprocessendtime, "
    "assigntime, starttime, endtime, postprocessstarttime, postprocessendtime, canceltime, attempts, callback_state, "
    "callback_attempts")


@pytest.fixture
def settings(tmp_path: Path, db_url: str):
    return make_settings(tmp_path, db_url)


def test_rows_stored_before_the_typed_record_still_read_and_run(settings, tiny_generator):
    db = Database(settings.sqlalchemy_url)
    upgrade(db, "0003")
    with db.connect(write=True) as conn:
        conn.execute(text(
            f"INSERT INTO tasks ({_TASK_COLUMNS_0004}) VALUES "
            "(1, '6f1c9a52-8d0e-4b7a-9c3e-2a5b7d9e0f11', 'tokentokentokentokentokentoke', NULL, 'task_queue', "
            ":parameters, :image_url, NULL, '', "
            ":debugoutput, '', '0', 0, :no, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '', 0)"),
            {"parameters": json.dumps(LEGACY_PARAMETERS), "image_url": IMAGE_URL, "no": False,
             "debugoutput": "step 2/4 (50%), 1.00 it/s, elapsed 2.0s, remaining 2.0s"})
        conn.exec_driver_sql("INSERT INTO task_events (task_id, status, at, message) VALUES "
                             "(1, 'task_output', 2.0, 'step 2/4'), (1, 'task_queue', 1.0, '')")
        conn.exec_driver_sql(
            "INSERT INTO workers (id, state, pid, model, device, detail, started_at, heartbeat_at, version) VALUES "
            "('old/gpu0', 'ready', 1, 'tiny', 'cpu', 'RANDOM WEIGHTS: every video is noise; loaded in 1.0s', 1.0, "
            "1.0, '0.1.0'), ('plain/gpu0', 'ready', 2, 'tiny', 'cpu', 'loaded in 1.0s', 1.0, 1.0, '0.1.0')")
    upgrade(db)
    store = Store(db)
    try:
        legacy = store.reads.get(1)
        assert legacy.request is not None, "the migration made its record"
        assert record_of(legacy).image == ImageSource(url=IMAGE_URL) and record_of(legacy).callback_url == ""
        assert parameters_of(legacy) == LEGACY_PARAMETERS, "the parameters as recorded"
        assert list(parameters_of(legacy)) == list(LEGACY_PARAMETERS), "in the order recorded"
        assert debug_output(legacy) == "step 2/4 (50%), 1.00 it/s, elapsed 2.0s, remaining 2.0s", "as recorded"
        progress = [(e.step, e.total) for e in store.reads.events(1) if e.status == OUTPUT]
        assert progress == [(2, 4)], "the recorded step is a number now"
        assert {w.id: w.random_weights for w in store.workers.all()} == {"old/gpu0": True, "plain/gpu0": False}

        worker = Worker(store, open_storage(settings), tiny_generator, worker_options(settings),
                        worker_id=WORKER, fetch=FakeFetch(png_bytes(40, 40)))
        assert worker.run_once()
        done = store.reads.get(1)
        assert done.pexit == "0" and done.status == "task_postprocess_end", done.debugerror
        assert parameters_of(done) == {**LEGACY_PARAMETERS, "seed": "3", "width": "32", "height": "32"}
    finally:
        db.dispose()


def _downgrade(db: Database, revision: str) -> None:
    from alembic import command

    from server.store.migrate import alembic_config

    config = alembic_config()
    with db.connect(write=True) as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def test_the_migration_gives_every_older_row_its_record_and_drops_the_columns_that_shadowed_it(db_url: str):
    """A database at 0004 holding a task stored before 0004 (no record: an upload, a callback, an owner, events, an
    output) and one stored at 0004 (a record, and the shadow columns written from it): after 0005 both are read
    through their record alone, answer what they answered, and keep their events, output and upload."""
    db = Database(db_url)
    upgrade(db, "0004")
    sent = {"inputImage": "http://testserver/files/uploads/u1/dog.png", **SMALL, "prompt": "a dog"}
    recorded = {**sent, **{name: str(value) for name, value in GenerationParams.model_validate(sent).wiro_inputs()
                           .items() if value is not None and name not in sent}}
    at_0004 = TaskRecord(params=GenerationParams.model_validate(LEGACY_SENT), inputs=LEGACY_SENT,
                         image=ImageSource(url=IMAGE_URL), callback_url="https://hooks.example/b", owner="key-b")
    with db.connect(write=True) as conn:
        insert = text(f"INSERT INTO tasks ({_TASK_COLUMNS_0004}, request) VALUES (:id, :uuid, :token, :owner, "
                      "'task_postprocess_end', :parameters, :image_url, :upload_id, :callbackurl, 'done', '', '0', 0, "
                      ":no, 1.0, 2.0, 0, 0, 0, 0, 3.0, 0, 4.0, 0, 1, 'delivered', 1, :request)"
                      ).bindparams(bindparam("request", type_=JSON(none_as_null=True)))
        conn.execute(insert, [
            {"id": 1, "uuid": "6f1c9a52-8d0e-4b7a-9c3e-2a5b7d9e0f11", "token": "a" * 30, "owner": "key-a",
             "parameters": json.dumps(recorded), "image_url": sent["inputImage"], "upload_id": "u1",
             "callbackurl": "https://hooks.example/a", "no": False, "request": None},
            {"id": 2, "uuid": "7f1c9a52-8d0e-4b7a-9c3e-2a5b7d9e0f11", "token": "b" * 30, "owner": "key-b",
             "parameters": json.dumps(at_0004.wiro_parameters()), "image_url": IMAGE_URL, "upload_id": None,
             "callbackurl": "https://hooks.example/b", "no": False, "request": at_0004.model_dump(mode="json")},
        ])
        conn.exec_driver_sql("INSERT INTO task_events (task_id, status, at, message) VALUES "
                             "(1, 'task_queue', 1.0, ''), (1, 'task_postprocess_end', 4.0, ''), "
                             "(2, 'task_queue', 1.0, '')")
        conn.exec_driver_sql("INSERT INTO outputs (id, task_id, name, contenttype, parentid, size, addedtime, "
                             "modifiedtime, accesskey, path) VALUES ('o1', 1, '0.mp4', 'video/mp4', 'p', 10, 4.0, "
                             "4.0, 'k', 'x/0.mp4')")
        conn.execute(text("INSERT INTO uploads (id, name, contenttype, size, data, addedtime, accesskey, owner, "
                          "task_id) VALUES ('u1', 'dog.png', 'image/png', 3, :data, 1.0, 'k', 'key-a', 1)"),
                     {"data": b"png"})
    upgrade(db)
    store = Store(db)
    try:
        columns = {c["name"] for c in inspect(db.engine).get_columns("tasks")}
        assert not columns & {"parameters", "image_url", "upload_id", "callbackurl"} and "owner" in columns
        older, newer = store.reads.get(1), store.reads.get(2)
        assert record_of(older) == TaskRecord(
            params=GenerationParams.model_validate(recorded), inputs=recorded,
            image=ImageSource(url=sent["inputImage"], upload_id="u1"), callback_url="https://hooks.example/a",
            owner="key-a")
        assert parameters_of(older) == recorded and list(parameters_of(older)) == list(recorded)
        assert record_of(older).image.field == "inputImage", "the worker names the uploaded image as before"
        assert record_of(newer) == at_0004 and parameters_of(newer) == at_0004.wiro_parameters(), "left as it was"
        assert [e.status for e in store.reads.events(1)] == ["task_queue", "task_postprocess_end"]
        assert [o.id for o in store.reads.outputs([1])[1]] == ["o1"], "the table was not copied (no cascade)"
        assert store.uploads.get("u1").task_id == 1
        assert [t.id for t in store.reads.list(owner="key-a")[1]] == [1], "owner still finds its tasks"

        _downgrade(db, "0004")  # and back: the columns again, filled from the records
        with db.connect() as conn:
            rows = conn.execute(text("SELECT id, image_url, upload_id, callbackurl, parameters, request FROM tasks "
                                     "ORDER BY id")).all()
        assert [(r.id, r.image_url, r.upload_id, r.callbackurl) for r in rows] == [
            (1, sent["inputImage"], "u1", "https://hooks.example/a"), (2, IMAGE_URL, None, "https://hooks.example/b")]
        assert json.loads(rows[0].parameters) == recorded and rows[0].request is not None
    finally:
        db.dispose()


def test_detail_renders_progress_from_its_numbers_until_other_news(store):
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, **SMALL}, image_url=IMAGE_URL)
    store.tasks.claim_next(WORKER)
    store.tasks.progress(task.id, WORKER, 3, 30, 2.0)
    running = store.reads.find(str(task.id))
    assert (running.progress_step, running.progress_total, running.progress_elapsed) == (3, 30, 2.0)
    assert debug_output(running) == "step 3/30 (10%), 1.50 it/s, elapsed 2.0s, remaining 18.0s"
    (event,) = [e for e in store.reads.events(task.id) if e.status == OUTPUT]
    assert (event.message, event.step, event.total) == ("step 3/30", 3, 30)
    store.tasks.request_kill(task.id)
    assert debug_output(store.reads.find(str(task.id))) == "Task killed by request at task_output."


def test_progress_text_speaks_in_seconds_per_step_when_a_step_takes_longer_than_a_second():
    assert progress_text(1, 4, 6.6) == "step 1/4 (25%), 6.60 s/it, elapsed 6.6s, remaining 19.8s"
    assert progress_text(4, 4, 0.0) == "step 4/4 (100%), 0.00 s/it, elapsed 0.0s, remaining 0.0s"


def test_the_recorded_parameters_are_the_inputs_as_sent_the_defaults_and_what_the_worker_used(store):
    task = create_task(store, parameters={"inputImageUrl": IMAGE_URL, "scale": "5", "seed": " 9", "mode": ""},
                       image_url=IMAGE_URL)
    shown = parameters_of(store.reads.get(task.id))
    assert (shown["scale"], shown["seed"], shown["mode"], shown["numFrames"], shown["flowShift"]) == (
        "5", " 9", "", "81", "5.0"), "as sent, else the default"
    assert list(shown)[:4] == ["inputImageUrl", "scale", "seed", "mode"], "in the order sent, defaults after"


def test_every_outcome_has_one_row_and_each_failure_says_why():
    assert set(HANDLING) == set(Outcome)
    discarded = {o for o, h in HANDLING.items() if h.discard}
    kept = {Outcome.DONE, Outcome.LOST, Outcome.STOPPED, Outcome.STORE_OUTAGE, Outcome.UNRECORDED}
    assert discarded == set(Outcome) - kept, (
        "files are thrown away only for an ending recorded on a task that is still ours: a done or lost task, and "
        "a run that stored nothing (stopped, store outage) or may be recorded already (unrecorded), keep them")
    assert HANDLING[Outcome.INTERNAL_ERROR].level == logging.ERROR
    assert ending_of(TaskEnd(Outcome.BAD_INPUT, "Request parameter [x] ...")).note == "Request parameter [x] ..."
    assert ending_of(TaskKilled("killed")).outcome is Outcome.KILL_RECORDED, "a kill is not a lost task"
    assert ending_of(TaskLost("gone")).outcome is Outcome.LOST
    assert ending_of(OperationalError("x", {}, ConnectionRefusedError())).outcome is Outcome.STORE_OUTAGE
    internal = ending_of(RuntimeError("boom"))
    assert (internal.outcome, internal.note) == (Outcome.INTERNAL_ERROR, "Internal error: RuntimeError: boom")
    with pytest.raises(IntegrityError):  # a store bug is not an outcome
        ending_of(IntegrityError("x", {}, Exception("y")))
