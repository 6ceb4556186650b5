"""Output storage behind fsspec: the local default, memory:// and file:// URLs end to end (worker -> storage ->
GET /files), replicas sharing one database and one storage, atomic puts, the free-disk floor, and settings errors."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fsspec.implementations.memory import MemoryFileSystem

from particalize.compose_server import build_app, open_storage
from particalize.core_options import store_options, worker_options
from particalize.settings import Settings
from pipeline.video import read_mp4
from server.storage import OUTPUT_NAME, Storage
from server.store import Database, NewUpload, Store, new_id, upgrade
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.tasks import create_task
from tests.test_worker import Spy

RUN = "/v1/Run/codexq/Particalize"
SMALL = {"numFrames": "9", "steps": "2", "width": "32", "height": "32", "seed": "5"}
WORKER = "testnode/gpu0"
Usage = namedtuple("Usage", "total used free")


def memory_url() -> str:
    """A memory:// storage of this test's own (the memory filesystem is shared by the whole process)."""
    return f"memory://particalize-test-{secrets.token_hex(6)}/outputs"


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tasks.db'}"


@pytest.fixture
def store_of():
    """Open (and migrate) the task store of some settings; closed at the end of the test."""
    opened: list[Store] = []

    def open_store(settings) -> Store:
        db = Database(settings.sqlalchemy_url)
        upgrade(db)
        opened.append(Store(db, store_options(settings)))
        return opened[-1]

    yield open_store
    for store in opened:
        store.db.dispose()


def queue_upload_task(store: Store):
    upload = NewUpload(new_id(), "in.png", "image/png", png_bytes(40, 40))
    return create_task(store, parameters=SMALL, image_url="http://testserver/files/uploads/x/in.png", new_upload=upload)


def run_one(store: Store, storage: Storage, settings, generator) -> None:
    assert Worker(store, storage, generator, worker_options(settings), worker_id=WORKER).run_once()


def leftovers(storage: Storage, task_uuid: str) -> list[str]:
    """Every file under the task's directory in the storage, temporary ones included."""
    path = f"{storage.root}/{task_uuid}"
    return sorted(storage.fs.find(path)) if storage.fs.exists(path) else []


def decode(tmp_path: Path, data: bytes):
    path = tmp_path / "fetched.mp4"
    path.write_bytes(data)
    return read_mp4(path)[1]


def run_through_api(client: TestClient, settings, generator, storage: Storage | None = None) -> dict:
    """Run one task: upload and Run on `client`, a worker (on the app's services unless `storage` is given) does it;
    answers the task's Detail."""
    services = client.app.state.services
    run = client.post(RUN, data=SMALL, files={"inputImage": ("in.png", png_bytes(40, 40), "image/png")}).json()
    assert run["result"] is True, run
    run_one(services.store, storage or services.storage, settings, generator)
    return client.post("/v1/Task/Detail", data={"taskid": run["taskid"]}).json()["tasklist"][0]


# --- the default: a local directory, as before --------------------------------------------------------------


def test_without_storage_url_outputs_stay_in_the_local_outputs_directory(tmp_path: Path, tiny_generator,
                                                                           monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the worker encodes before storing
    settings = make_settings(tmp_path, sqlite_url(tmp_path))
    with TestClient(build_app(settings)) as client:
        storage = client.app.state.services.storage
        assert storage.local_root == Path(settings.outputs_dir).resolve()
        task = run_through_api(client, settings, tiny_generator)
        assert task["pexit"] == "0", task["debugerror"]
        (out,) = task["outputs"]
        assert out["url"] == f"http://testserver/files/{task['uuid']}/0.mp4"
        path = Path(settings.outputs_dir) / task["uuid"] / "0.mp4"
        assert sorted(p.name for p in path.parent.iterdir()) == ["0.mp4"], "no temporary files left"
        assert path.stat().st_size == int(out["size"])
        got = client.get(out["url"])
        assert got.status_code == 200 and got.content == path.read_bytes()
        assert got.headers["content-type"] == "video/mp4"
        head = client.head(out["url"])
        assert head.status_code == 200 and head.headers["content-length"] == out["size"] and head.content == b""
        assert list(scratch.iterdir()) == [], "the worker's temporary MP4 is gone once stored"


# --- memory://: worker -> storage -> GET /files ----------------------------------------------------------------


def test_a_memory_storage_round_trip_through_the_worker_and_get_files(tmp_path: Path, tiny_generator):
    settings = make_settings(tmp_path, sqlite_url(tmp_path), storage_url=memory_url())
    with TestClient(build_app(settings)) as client:
        storage = client.app.state.services.storage
        assert storage.local_root is None and isinstance(storage.fs, MemoryFileSystem)
        task = run_through_api(client, settings, tiny_generator)
        assert task["pexit"] == "0", task["debugerror"]
        (out,) = task["outputs"]
        assert out["url"] == f"http://testserver/files/{task['uuid']}/0.mp4"
        assert leftovers(storage, task["uuid"]) == [f"{storage.root}/{task['uuid']}/0.mp4"], "no temporary keys"
        stored = storage.fs.cat_file(f"{storage.root}/{task['uuid']}/0.mp4")
        assert len(stored) == int(out["size"]) == int(task["size"]), "size recorded is the stored file's"
        assert not Path(settings.outputs_dir).exists(), "nothing written to the local outputs directory"

        got = client.get(out["url"])
        assert got.status_code == 200 and got.headers["content-type"] == "video/mp4"
        assert got.content == stored and got.headers["content-length"] == out["size"]
        assert decode(tmp_path, got.content).shape == (9, 32, 32, 3)
        head = client.head(out["url"])
        assert head.status_code == 200 and head.headers["content-length"] == out["size"] and head.content == b""
        assert head.headers["content-type"] == "video/mp4"

        deleted = client.post("/v1/Task/InputOutputDelete", data={"tasktoken": task["socketaccesstoken"]}).json()
        assert deleted == {"result": True, "errors": []}
        assert leftovers(storage, task["uuid"]) == [] and client.get(out["url"]).status_code == 404


def test_only_plain_output_names_are_served_from_a_remote_storage(tmp_path: Path):
    settings = make_settings(tmp_path, sqlite_url(tmp_path), storage_url=memory_url())
    uuid = "00000000-0000-0000-0000-000000000000"
    with TestClient(build_app(settings)) as client:
        storage = client.app.state.services.storage
        storage.fs.pipe_file(f"{storage.root}/{uuid}/.0.mp4.abc.part", b"half a video")
        storage.fs.pipe_file(f"{storage.root.rsplit('/', 1)[0]}/secret.txt", b"not for you")
        for path in (f"/files/{uuid}/.0.mp4.abc.part", "/files/../secret.txt", f"/files/{uuid}/..%2F..%2Fsecret.txt",
                     f"/files/{uuid}/missing.mp4", f"/files/{uuid}", "/files/not-a-uuid/0.mp4"):
            answer = client.get(path)
            assert answer.status_code == 404, path
            assert "half a video" not in answer.text and "not for you" not in answer.text


def test_an_unreachable_storage_answers_503_in_the_error_shape_not_500(tmp_path: Path, monkeypatch):
    settings = make_settings(tmp_path, sqlite_url(tmp_path), storage_url=memory_url())
    with TestClient(build_app(settings), raise_server_exceptions=False) as client:
        storage = client.app.state.services.storage

        def unreachable(path, **kwargs):
            raise ConnectionError("connection refused")

        monkeypatch.setattr(storage.fs, "info", unreachable)
        answer = client.get("/files/00000000-0000-0000-0000-000000000000/0.mp4")
        assert answer.status_code == 503
        assert answer.json()["result"] is False and "storage is unavailable" in answer.json()["errors"][0]["message"]


def test_input_output_delete_says_so_when_the_storage_refuses_and_a_retry_cleans_up(tmp_path: Path, tiny_generator,
                                                                                      monkeypatch):
    settings = make_settings(tmp_path, sqlite_url(tmp_path), storage_url=memory_url())
    with TestClient(build_app(settings)) as client:
        storage = client.app.state.services.storage
        task = run_through_api(client, settings, tiny_generator)
        body = {"tasktoken": task["socketaccesstoken"]}
        with monkeypatch.context() as patch:
            patch.setattr(storage.fs, "rm", lambda *a, **k: (_ for _ in ()).throw(PermissionError("access denied")))
            patch.setattr(storage.fs, "rm_file", lambda *a, **k: (_ for _ in ()).throw(PermissionError("denied")))
            refused = client.post("/v1/Task/InputOutputDelete", data=body).json()
        assert refused["result"] is False and "could not be deleted" in refused["errors"][0]["message"]
        assert leftovers(storage, task["uuid"]) != []
        assert client.post("/v1/Task/InputOutputDelete", data=body).json() == {"result": True, "errors": []}
        assert leftovers(storage, task["uuid"]) == []
        assert client.get(task["outputs"][0]["url"]).status_code == 404


# --- replicas: one database, one storage URL ----------------------------------------------------------------


def test_two_api_replicas_sharing_database_and_storage_both_serve_what_a_worker_stored(
    tmp_path: Path, db_url: str, tiny_generator, store_of
):
    shared = tmp_path / "shared-outputs"
    common = dict(storage_url=shared.as_uri(), public_base_url="http://lb.example")
    replica_a = make_settings(tmp_path / "a", db_url, **common)
    replica_b = make_settings(tmp_path / "b", db_url, **common)
    worker_host = make_settings(tmp_path / "w", db_url, **common)
    with TestClient(build_app(replica_a)) as a, TestClient(build_app(replica_b)) as b:
        run = a.post(RUN, data=SMALL, files={"inputImage": ("in.png", png_bytes(40, 40), "image/png")}).json()
        store = store_of(worker_host)
        run_one(store, open_storage(worker_host), worker_host, tiny_generator)

        seen = [c.post("/v1/Task/Detail", data={"taskid": run["taskid"]}).json()["tasklist"][0] for c in (a, b)]
        assert seen[0]["outputs"] == seen[1]["outputs"] and seen[0]["pexit"] == "0", seen[0]["debugerror"]
        (out,) = seen[0]["outputs"]
        assert out["url"] == f"http://lb.example/files/{seen[0]['uuid']}/0.mp4", "URLs point at the load balancer"
        path = f"/files/{seen[0]['uuid']}/0.mp4"
        on_disk = (shared / seen[0]["uuid"] / "0.mp4").read_bytes()
        for client in (a, b):
            got = client.get(path)
            assert got.status_code == 200 and got.content == on_disk and got.headers["content-type"] == "video/mp4"
        for settings in (replica_a, replica_b, worker_host):
            assert not Path(settings.outputs_dir).exists(), "no replica kept a private copy"


# --- atomic puts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_put_that_fails_midway_leaves_nothing_and_the_task_fails_with_the_reason(
    tmp_path: Path, tiny_generator, store_of, monkeypatch, kind: str
):
    settings = make_settings(tmp_path, sqlite_url(tmp_path), storage_url=None if kind == "local" else memory_url())
    store, storage = store_of(settings), open_storage(settings)
    task, following = queue_upload_task(store), queue_upload_task(store)
    final = f"{storage.root}/{task.uuid}/{OUTPUT_NAME}"
    seen: dict[str, object] = {}
    real_put = storage.fs.put_file

    def broken_put(lpath, rpath, **kwargs):
        data = Path(lpath).read_bytes()
        with storage.fs.open(rpath, "wb") as half:
            half.write(data[: len(data) // 2])
        seen["target"], seen["final_visible"] = rpath, storage.fs.exists(final)
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(storage.fs, "put_file", broken_put)
    worker = Worker(store, storage, tiny_generator, worker_options(settings), worker_id=WORKER)
    assert worker.run_once()
    failed = store.reads.get(task.id)
    assert failed.status == "task_postprocess_end" and failed.pexit == "1"
    assert "Could not store the output" in failed.debugerror and "connection reset by peer" in failed.debugerror
    assert seen["target"] != final and seen["final_visible"] is False, "the partial bytes never had the final name"
    assert not storage.fs.exists(final) and leftovers(storage, task.uuid) == [], "no partial or temporary file left"
    assert store.reads.outputs([task.id])[task.id] == []

    monkeypatch.setattr(storage.fs, "put_file", real_put)
    assert worker.run_once(), "the worker stays up and takes the next task"
    assert store.reads.get(following.id).pexit == "0"
    assert leftovers(storage, following.uuid) == [f"{storage.root}/{following.uuid}/{OUTPUT_NAME}"]


# --- free disk space --------------------------------------------------------------------------------------


def test_under_the_disk_floor_a_worker_claims_nothing_says_why_and_resumes_once_there_is_room(
    tmp_path: Path, tiny_generator, store_of, monkeypatch
):
    settings = make_settings(tmp_path, sqlite_url(tmp_path), min_free_disk_bytes=10**18)
    store, storage = store_of(settings), open_storage(settings)
    store.workers.register(WORKER, pid=1, model="tiny", device="cpu", state="ready")
    task = queue_upload_task(store)
    spy = Spy(tiny_generator)
    worker = Worker(store, storage, spy, worker_options(settings), worker_id=WORKER)
    assert worker.run_once() is False and worker.run_once() is False
    assert spy.calls == 0, "no GPU time spent on a video that could not be written"
    assert store.reads.get(task.id).status == "task_queue", "the task waits in the queue, not failed"
    (row,) = store.workers.all()
    free = shutil.disk_usage(tempfile.gettempdir()).free
    assert row.state == "paused" and "Not enough free disk space" in row.detail
    assert "free in the worker's temporary directory" in row.detail and tempfile.gettempdir() not in row.detail
    assert f"({10**18} bytes) needed" in row.detail and "PARTICALIZE_MIN_FREE_DISK_BYTES" in row.detail
    reported = int(row.detail.split(" bytes) free")[0].rsplit("(", 1)[1])
    assert abs(reported - free) < 2**30, "the free space reported is the real one"

    monkeypatch.setattr(worker, "options", replace(worker.options, min_free_disk_bytes=0))
    assert worker.run_once(), "once there is room the worker takes the task"
    assert store.reads.get(task.id).pexit == "0" and spy.calls == 1
    assert store.workers.all()[0].state == "ready"


def test_the_local_storage_directory_is_checked_for_free_space_too(tmp_path: Path, tiny_generator, store_of,
                                                                    monkeypatch):
    settings = make_settings(tmp_path, sqlite_url(tmp_path), min_free_disk_bytes=50 * 2**20)
    store, storage = store_of(settings), open_storage(settings)
    store.workers.register(WORKER, pid=1, model="tiny", device="cpu", state="ready")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real_usage = shutil.disk_usage

    def usage(path):
        if Path(path) == scratch:
            return real_usage(path)  # room to encode
        return Usage(100 * 2**20, 90 * 2**20, 10 * 2**20)  # but 10 MiB free where the outputs go

    monkeypatch.setattr("server.storage.shutil.disk_usage", usage)
    task = queue_upload_task(store)
    assert Worker(store, storage, tiny_generator, worker_options(settings), worker_id=WORKER).run_once() is False
    assert store.reads.get(task.id).status == "task_queue"
    detail = store.workers.all()[0].detail
    assert f"10.0 MiB ({10 * 2**20} bytes) free in the output storage" in detail
    assert f"at least 50.0 MiB ({50 * 2**20} bytes) needed" in detail and str(storage.local_root) not in detail


def test_space_that_runs_out_while_generating_fails_the_task_before_writing_naming_no_server_path(
    tmp_path: Path, tiny_generator, store_of, monkeypatch
):
    settings = make_settings(tmp_path, sqlite_url(tmp_path), min_free_disk_bytes=0)
    store, storage = store_of(settings), open_storage(settings)
    task = queue_upload_task(store)

    class FillsTheDisk(Spy):
        def generate(self, *args, **kwargs):
            video = super().generate(*args, **kwargs)  # another process filled the disk:
            monkeypatch.setattr(worker, "options", replace(worker.options, min_free_disk_bytes=10**18))
            return video

    worker = Worker(store, storage, FillsTheDisk(tiny_generator), worker_options(settings), worker_id=WORKER)
    assert worker.run_once()
    failed = store.reads.get(task.id)
    assert failed.status == "task_postprocess_end" and failed.pexit == "1"
    assert "Not enough free disk space" in failed.debugerror
    assert tempfile.gettempdir() not in failed.debugerror and str(tmp_path) not in failed.debugerror
    assert not (Path(settings.outputs_dir) / task.uuid).exists()


def test_a_storage_error_reaches_the_client_without_server_paths(tmp_path: Path, tiny_generator, store_of,
                                                                  monkeypatch):
    settings = make_settings(tmp_path, sqlite_url(tmp_path), min_free_disk_bytes=0)
    store, storage = store_of(settings), open_storage(settings)
    task = queue_upload_task(store)

    def full(lpath, rpath, **kwargs):
        raise OSError(28, "No space left on device", rpath)

    monkeypatch.setattr(storage.fs, "put_file", full)
    Worker(store, storage, tiny_generator, worker_options(settings), worker_id=WORKER).run_once()
    failed = store.reads.get(task.id)
    assert failed.pexit == "1" and "No space left on device" in failed.debugerror
    assert str(tmp_path) not in failed.debugerror and ".part" not in failed.debugerror, failed.debugerror


def test_storage_options_reach_the_fsspec_filesystem(tmp_path: Path):
    settings = make_settings(tmp_path, storage_url=memory_url(), storage_options='{"anon": true, "retries": 3}')
    storage = open_storage(settings)
    assert storage.fs.storage_options == {"anon": True, "retries": 3}


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "PARTICALIZE_STORAGE_OPTIONS is not valid JSON"),
    ('["endpoint_url"]', "PARTICALIZE_STORAGE_OPTIONS must be a JSON object"),
    ('"s3"', "PARTICALIZE_STORAGE_OPTIONS must be a JSON object"),
])
def test_storage_options_that_are_not_a_json_object_are_a_settings_error(monkeypatch, tmp_path: Path, text: str,
                                                                         expected: str):
    bypassed = make_settings(tmp_path).model_copy(update={"storage_options": text})
    with pytest.raises(ValueError, match=expected):
        open_storage(bypassed)
    monkeypatch.setenv("PARTICALIZE_STORAGE_OPTIONS", text)
    with pytest.raises(ValueError, match=expected):
        Settings()


def test_empty_storage_options_mean_none(monkeypatch):
    monkeypatch.setenv("PARTICALIZE_STORAGE_OPTIONS", "")
    assert Settings().storage_options in (None, "")


def test_an_unusable_storage_url_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="PARTICALIZE_STORAGE_URL=nosuchproto://x is not a usable fsspec URL"):
        open_storage(make_settings(tmp_path, storage_url="nosuchproto://x"))


def test_s3_without_the_s3_extra_says_how_to_install_it(tmp_path: Path):
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("s3fs is installed here")
    with pytest.raises(ValueError, match=r"pip install 'particalize\[s3\]'"):
        open_storage(make_settings(tmp_path, storage_url="s3://bucket/outputs"))
